//! The built-in certificate authority: an ECDSA P-256 CA created once by
//! `flotte-server init`, and the issuance of server, operator and machine
//! certificates from it.
//!
//! Every certificate carries exactly one identity URI SAN (see
//! `flotte_proto::identity`). Certificates are issued from a public key the
//! requester proved it holds (a CSR); the CA never uses anything else a CSR
//! asks for, so a caller cannot request a name or a lifetime.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use flotte_proto::identity::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use ring::digest;

use flotte_proto::files;

/// Certificates start a minute in the past so that a machine whose clock is
/// slightly behind does not see a certificate "from the future".
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("a CA already exists at {0}: refusing to overwrite it")]
    AlreadyExists(PathBuf),
    #[error("no CA at {0}: run `flotte-server init` first")]
    Missing(PathBuf),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),
    #[error("certificate signing request is invalid: {0}")]
    BadCsr(rcgen::Error),
    #[error("certificate is not valid PEM/X.509: {0}")]
    BadCertificate(String),
    #[error("certificate was not issued by this CA")]
    ForeignCertificate,
}

/// An issued certificate with the facts the server records about it.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    pub serial_hex: String,
    pub not_after: SystemTime,
}

/// The CA's certificate and signing key, loaded from `<data-dir>/ca/`.
pub struct CertificateAuthority {
    certificate_pem: String,
    certificate_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

pub fn ca_certificate_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ca").join("ca.pem")
}

fn ca_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ca").join("ca.key")
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // uuid v4 draws from the OS RNG; clearing the top bit keeps the serial
    // positive, and a first byte of at least 1 keeps it 16 bytes long in DER
    // (minimal encoding drops a leading zero byte, and the serial recorded at
    // issue would then differ from the one read back from the certificate).
    bytes.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn serial_hex(serial: &SerialNumber) -> String {
    hex::encode(serial.to_bytes())
}

/// Lowercase hex SHA-256 of a DER certificate: the fingerprint carried by join tokens.
pub fn fingerprint_of_der(der: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, der))
}

fn parse_pem_certificate(pem: &str) -> Result<Vec<u8>, CaError> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|error| CaError::BadCertificate(error.to_string()))?;
    Ok(parsed.contents)
}

impl CertificateAuthority {
    /// Creates a new CA in `<data_dir>/ca/`, refusing to overwrite an existing one.
    pub fn create(data_dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let certificate_path = ca_certificate_path(data_dir);
        if certificate_path.exists() || ca_key_path(data_dir).exists() {
            return Err(CaError::AlreadyExists(certificate_path));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Flotte");
        // A unique name per CA: two CAs with the same subject make a verifier
        // try the wrong issuer and report a bad signature instead of "unknown CA".
        let unique = uuid::Uuid::new_v4().simple().to_string();
        name.push(
            DnType::CommonName,
            format!("Flotte CA {trust_domain} {}", &unique[..8]),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
        params.not_after = (now + CA_LIFETIME).into();
        let certificate = params.self_signed(&key)?;
        let ca_dir = data_dir.join("ca");
        files::create_private_dir(&ca_dir).map_err(io_error(&ca_dir))?;
        let key_path = ca_key_path(data_dir);
        files::write_private(&key_path, key.serialize_pem().as_bytes())
            .map_err(io_error(&key_path))?;
        files::write_atomically(&certificate_path, certificate.pem().as_bytes())
            .map_err(io_error(&certificate_path))?;
        Ok(CertificateAuthority {
            certificate_pem: certificate.pem(),
            certificate_der: certificate.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA written by [`CertificateAuthority::create`].
    pub fn load(data_dir: &Path) -> Result<Self, CaError> {
        let certificate_path = ca_certificate_path(data_dir);
        if !certificate_path.exists() {
            return Err(CaError::Missing(certificate_path));
        }
        let certificate_pem =
            std::fs::read_to_string(&certificate_path).map_err(io_error(&certificate_path))?;
        let key_path = ca_key_path(data_dir);
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_error(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&certificate_pem, key)?;
        let certificate_der = parse_pem_certificate(&certificate_pem)?;
        Ok(CertificateAuthority {
            certificate_pem,
            certificate_der,
            issuer,
        })
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate_der
    }

    /// SHA-256 of the CA certificate, lowercase hex.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_der(&self.certificate_der)
    }

    fn issue(
        &self,
        public_key: &impl PublicKeyData,
        identity: &Identity,
        extra_names: &[SanType],
        usage: ExtendedKeyUsagePurpose,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, identity.name.clone());
        params.distinguished_name = name;
        let uri = rcgen::string::Ia5String::try_from(identity.uri())?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.subject_alt_names.extend(extra_names.iter().cloned());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let serial = random_serial();
        let serial_hex = serial_hex(&serial);
        params.serial_number = Some(serial);
        let now = SystemTime::now();
        let not_after = now + lifetime;
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
        params.not_after = not_after.into();
        let certificate = params.signed_by(public_key, &self.issuer)?;
        Ok(IssuedCertificate {
            certificate_pem: certificate.pem(),
            serial_hex,
            // X.509 stores whole seconds; report what the certificate says.
            not_after: truncate_to_seconds(not_after),
        })
    }

    /// Issues a client certificate for `identity` from a PEM CSR. Only the
    /// CSR's public key is used; its signature proves the requester holds the key.
    pub fn issue_client_from_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        self.issue(
            &csr.public_key,
            identity,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            lifetime,
        )
    }

    /// Issues a client certificate and a fresh key generated here (used for the
    /// admin profile made by `init`, which is written straight to the server's disk).
    pub fn issue_client_with_new_key(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<(IssuedCertificate, KeyPair), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issued = self.issue(
            &key,
            identity,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            lifetime,
        )?;
        Ok((issued, key))
    }

    /// Issues the server's own certificate for the given DNS names / IP addresses.
    pub fn issue_server(
        &self,
        identity: &Identity,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(IssuedCertificate, KeyPair), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            sans.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(rcgen::string::Ia5String::try_from(name.as_str())?),
            });
        }
        let issued = self.issue(
            &key,
            identity,
            &sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            lifetime,
        )?;
        Ok((issued, key))
    }

    /// Checks that `certificate_pem` was signed by this CA, ignoring its
    /// validity period, and returns its identity URI, serial and public key.
    /// Used to let an agent whose certificate expired prove who it was.
    pub fn verify_ignoring_expiry(
        &self,
        certificate_pem: &str,
    ) -> Result<CertificateFacts, CaError> {
        let der = parse_pem_certificate(certificate_pem)?;
        let (_, certificate) = x509_parser::parse_x509_certificate(&der)
            .map_err(|error| CaError::BadCertificate(error.to_string()))?;
        let (_, ca) = x509_parser::parse_x509_certificate(&self.certificate_der)
            .map_err(|error| CaError::BadCertificate(error.to_string()))?;
        certificate
            .verify_signature(Some(ca.public_key()))
            .map_err(|_| CaError::ForeignCertificate)?;
        certificate_facts(&certificate)
    }
}

fn truncate_to_seconds(time: SystemTime) -> SystemTime {
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|duration| duration.as_secs())
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
}

/// What the server needs to know about a presented certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    pub identity_uri: Option<String>,
    pub serial_hex: String,
    pub not_after_unix: i64,
    /// The raw subject public key bits (as in a CSR), not the SPKI wrapper.
    pub public_key_raw: Vec<u8>,
}

/// Extracts identity URI, serial and expiry from a parsed certificate.
pub fn certificate_facts(
    certificate: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<CertificateFacts, CaError> {
    let mut identity_uri = None;
    if let Ok(Some(san)) = certificate.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                identity_uri = Some((*uri).to_owned());
            }
        }
    }
    Ok(CertificateFacts {
        identity_uri,
        serial_hex: hex::encode(certificate.raw_serial()),
        not_after_unix: certificate.validity().not_after.timestamp(),
        public_key_raw: certificate.public_key().subject_public_key.data.to_vec(),
    })
}

/// Parses DER and extracts [`CertificateFacts`].
pub fn certificate_facts_from_der(der: &[u8]) -> Result<CertificateFacts, CaError> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|error| CaError::BadCertificate(error.to_string()))?;
    certificate_facts(&certificate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flotte-ca-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn issues_from_csr_only_the_requested_identity() {
        let dir = temp_dir();
        let ca = CertificateAuthority::create(&dir, "flotte.test").unwrap();
        let machine_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut request = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        request.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = request
            .serialize_request(&machine_key)
            .unwrap()
            .pem()
            .unwrap();
        let identity = Identity::machine("flotte.test", uuid::Uuid::new_v4());
        let issued = ca
            .issue_client_from_csr(&csr, &identity, Duration::from_secs(60))
            .unwrap();
        let facts = ca.verify_ignoring_expiry(&issued.certificate_pem).unwrap();
        assert_eq!(facts.identity_uri, Some(identity.uri()));
        assert_eq!(facts.serial_hex, issued.serial_hex);
        assert_eq!(facts.public_key_raw, machine_key.public_key_raw());
        let der = parse_pem_certificate(&issued.certificate_pem).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(
            !parsed.is_ca(),
            "a CSR must not be able to ask for a CA certificate"
        );
        let names = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(names.value.general_names.len(), 1, "only the identity URI");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_recorded_serial_is_the_one_in_the_certificate() {
        // One serial in 128 had a leading zero byte before the fix: 1 000
        // certificates find that with near certainty.
        let dir = temp_dir();
        let ca = CertificateAuthority::create(&dir, "flotte.test").unwrap();
        let machine_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::new(Vec::new())
            .unwrap()
            .serialize_request(&machine_key)
            .unwrap()
            .pem()
            .unwrap();
        let identity = Identity::machine("flotte.test", uuid::Uuid::new_v4());
        for _ in 0..1000 {
            let issued = ca
                .issue_client_from_csr(&csr, &identity, Duration::from_secs(60))
                .unwrap();
            let facts = ca.verify_ignoring_expiry(&issued.certificate_pem).unwrap();
            assert_eq!(facts.serial_hex, issued.serial_hex);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_to_overwrite_and_reloads_the_same_ca() {
        let dir = temp_dir();
        let created = CertificateAuthority::create(&dir, "flotte.test").unwrap();
        assert!(matches!(
            CertificateAuthority::create(&dir, "flotte.test"),
            Err(CaError::AlreadyExists(_))
        ));
        let loaded = CertificateAuthority::load(&dir).unwrap();
        assert_eq!(loaded.fingerprint(), created.fingerprint());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_foreign_certificate_is_recognised() {
        let (dir_a, dir_b) = (temp_dir(), temp_dir());
        let ca_a = CertificateAuthority::create(&dir_a, "a").unwrap();
        let ca_b = CertificateAuthority::create(&dir_b, "b").unwrap();
        let (issued_by_b, _) = ca_b
            .issue_client_with_new_key(&Identity::operator("b", "x"), Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            ca_a.verify_ignoring_expiry(&issued_by_b.certificate_pem),
            Err(CaError::ForeignCertificate)
        ));
        std::fs::remove_dir_all(dir_a).unwrap();
        std::fs::remove_dir_all(dir_b).unwrap();
    }
}
