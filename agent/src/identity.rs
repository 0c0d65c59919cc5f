//! The machine's identity on disk: `<data-dir>/identity/` holds the private
//! key (0600, generated here and never sent anywhere), the current certificate
//! and the CA certificate learned at enrollment.
//!
//! Files are replaced atomically; a failed enrollment writes nothing.

use flotte_proto::data_dir_lock::permission_hint;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use flotte_proto::files;
use flotte_proto::identity::{Identity, IdentityKind};
use uuid::Uuid;

const KEY_FILE: &str = "key.pem";
const CERTIFICATE_FILE: &str = "cert.pem";
const CA_FILE: &str = "ca.pem";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write {path}: {source}{}", permission_hint(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key generation or CSR failed: {0}")]
    Key(#[from] rcgen::Error),
    #[error("certificate {what} is invalid: {reason}")]
    BadCertificate { what: String, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A machine identity: key, certificate, and the facts parsed from it.
#[derive(Clone)]
pub struct MachineIdentity {
    pub machine_id: Uuid,
    pub identity: Identity,
    pub key_pem: String,
    pub certificate_pem: String,
    pub ca_pem: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for MachineIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineIdentity")
            .field("identity", &self.identity.uri())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A freshly generated ECDSA P-256 key, PEM (PKCS#8).
pub fn generate_key() -> Result<String, IdentityError> {
    Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?.serialize_pem())
}

/// A CSR for `key_pem`. The server uses only its public key (and checks its
/// signature as proof that we hold the key); names are the server's to decide.
pub fn csr_for(key_pem: &str) -> Result<String, IdentityError> {
    let key = rcgen::KeyPair::from_pem(key_pem)?;
    Ok(rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?)
}

/// Identity URI and expiry from a PEM certificate.
pub fn certificate_facts(certificate_pem: &str) -> Result<(Identity, SystemTime), IdentityError> {
    let bad = |reason: String| IdentityError::BadCertificate {
        what: "from the server".into(),
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(certificate_pem.as_bytes())
        .map_err(|error| bad(error.to_string()))?;
    let certificate = pem.parse_x509().map_err(|error| bad(error.to_string()))?;
    let uri = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                _ => None,
            })
        })
        .ok_or_else(|| bad("no identity URI".into()))?;
    let identity: Identity = uri
        .parse()
        .map_err(|error: flotte_proto::identity::IdentityError| bad(error.to_string()))?;
    let not_after = u64::try_from(certificate.validity().not_after.timestamp())
        .map(|seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
        .map_err(|_| bad("expiry before 1970".into()))?;
    Ok((identity, not_after))
}

fn identity_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

impl MachineIdentity {
    /// Builds an identity from enrollment results, checking that the
    /// certificate names a machine.
    pub fn from_parts(
        key_pem: String,
        certificate_pem: String,
        ca_pem: String,
    ) -> Result<Self, IdentityError> {
        let (identity, not_after) = certificate_facts(&certificate_pem)?;
        let machine_id = match identity.kind {
            IdentityKind::Machine => {
                Uuid::parse_str(&identity.name).map_err(|error| IdentityError::BadCertificate {
                    what: "from the server".into(),
                    reason: error.to_string(),
                })?
            }
            _ => {
                return Err(IdentityError::BadCertificate {
                    what: "from the server".into(),
                    reason: format!("{identity} is not a machine identity"),
                })
            }
        };
        Ok(MachineIdentity {
            machine_id,
            identity,
            key_pem,
            certificate_pem,
            ca_pem,
            not_after,
        })
    }

    /// Loads the identity from `<data_dir>/identity/`; `None` if never enrolled.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, IdentityError> {
        let dir = identity_dir(data_dir);
        let certificate_path = dir.join(CERTIFICATE_FILE);
        // `try_exists`: an identity this user cannot read is an error naming
        // the permission, never "not enrolled".
        if !certificate_path
            .try_exists()
            .map_err(io_error(&certificate_path))?
        {
            return Ok(None);
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| IdentityError::Io { path, source })
        };
        Ok(Some(Self::from_parts(
            read(KEY_FILE)?,
            read(CERTIFICATE_FILE)?,
            read(CA_FILE)?,
        )?))
    }

    /// Writes every file; the certificate last, because its presence is what
    /// marks the machine as enrolled.
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let dir = identity_dir(data_dir);
        files::create_private_dir(&dir).map_err(io_error(&dir))?;
        let key_path = dir.join(KEY_FILE);
        files::write_private(&key_path, self.key_pem.as_bytes()).map_err(io_error(&key_path))?;
        let ca_path = dir.join(CA_FILE);
        files::write_atomically(&ca_path, self.ca_pem.as_bytes()).map_err(io_error(&ca_path))?;
        self.save_certificate(data_dir)
    }

    /// Replaces only the certificate (renewal keeps the key).
    pub fn save_certificate(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let path = identity_dir(data_dir).join(CERTIFICATE_FILE);
        files::write_atomically(&path, self.certificate_pem.as_bytes()).map_err(io_error(&path))
    }

    /// Adopts a renewed certificate for the same identity.
    pub fn with_certificate(&self, certificate_pem: String) -> Result<Self, IdentityError> {
        let renewed = Self::from_parts(self.key_pem.clone(), certificate_pem, self.ca_pem.clone())?;
        if renewed.identity != self.identity {
            return Err(IdentityError::BadCertificate {
                what: "renewal".into(),
                reason: format!("names {} instead of {}", renewed.identity, self.identity),
            });
        }
        Ok(renewed)
    }

    /// True once the certificate can no longer be used for a handshake.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.not_after <= now
    }

    /// When to ask for a new certificate: two thirds of the way from `from` to expiry.
    pub fn renew_at(&self, from: SystemTime) -> SystemTime {
        let remaining = self
            .not_after
            .duration_since(from)
            .unwrap_or(Duration::ZERO);
        from + remaining.mul_f64(2.0 / 3.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_carries_the_key_and_verifies() {
        let key = generate_key().unwrap();
        let csr = csr_for(&key).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let key_pair = rcgen::KeyPair::from_pem(&key).unwrap();
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(&parsed.public_key),
            key_pair.public_key_raw()
        );
    }

    #[test]
    fn renewal_is_scheduled_at_two_thirds_of_the_remaining_lifetime() {
        let key = generate_key().unwrap();
        let key_pair = rcgen::KeyPair::from_pem(&key).unwrap();
        let mut params = rcgen::CertificateParams::default();
        let machine_id = Uuid::new_v4();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(Identity::machine("t", machine_id).uri()).unwrap(),
        )];
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        params.not_after = (now + Duration::from_secs(300)).into();
        let certificate = params.self_signed(&key_pair).unwrap().pem();
        let identity = MachineIdentity::from_parts(key, certificate, String::new()).unwrap();
        assert_eq!(identity.machine_id, machine_id);
        assert_eq!(identity.renew_at(now), now + Duration::from_secs(200));
        assert!(!identity.is_expired(now));
        assert!(identity.is_expired(now + Duration::from_secs(300)));
    }
}
