//! Enrollment and re-enrollment: turning a join token (or an expired but
//! genuine certificate) plus a CSR into a machine identity.
//!
//! The machine's private key never reaches the server: we only ever see a CSR,
//! whose self-signature proves possession of the key.

use std::time::Duration;

use flotte_proto::identity::{Identity, IdentityKind};
use flotte_proto::join_token::JoinToken;
use ring::digest;
use uuid::Uuid;

use crate::ca::{CaError, CertificateAuthority, IssuedCertificate};
use crate::clock::{to_unix, Clock};
use crate::store::{Inventory, MachineRecord, Store, StoreError, TokenRedemption, TokenRefusal};

#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error("join token is malformed: {0}")]
    MalformedToken(#[from] flotte_proto::join_token::JoinTokenError),
    #[error("join token was made for another server's CA (fingerprint {token_fingerprint}, ours is {our_fingerprint})")]
    ForeignToken {
        token_fingerprint: String,
        our_fingerprint: String,
    },
    #[error("{0}")]
    Refused(#[from] TokenRefusal),
    #[error("certificate signing request refused: {0}")]
    BadCsr(CaError),
    #[error("re-enrollment refused: {0}")]
    ReenrollRefused(String),
    #[error("certificate authority failure: {0}")]
    Ca(CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// SHA-256 of a token secret, as stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, secret.as_bytes()))
}

#[derive(Debug, Clone)]
pub struct Enrolled {
    pub machine_id: Uuid,
    pub identity: Identity,
    pub certificate: IssuedCertificate,
}

pub struct Enroller<'a> {
    pub ca: &'a CertificateAuthority,
    pub store: &'a dyn Store,
    pub clock: &'a dyn Clock,
    pub trust_domain: &'a str,
    pub certificate_ttl: Duration,
    pub reenroll_expired_within: Duration,
}

fn csr_error(error: CaError) -> EnrollmentError {
    match error {
        CaError::BadCsr(_) => EnrollmentError::BadCsr(error),
        other => EnrollmentError::Ca(other),
    }
}

impl Enroller<'_> {
    /// Spends one use of the token and issues a certificate for a new machine.
    pub async fn enroll(
        &self,
        token_text: &str,
        csr_pem: &str,
        hostname: &str,
    ) -> Result<Enrolled, EnrollmentError> {
        let token: JoinToken = token_text.parse()?;
        let our_fingerprint = self.ca.fingerprint();
        if token.ca_fingerprint != our_fingerprint {
            return Err(EnrollmentError::ForeignToken {
                token_fingerprint: token.ca_fingerprint,
                our_fingerprint,
            });
        }
        // Validate the CSR before spending a use of the token on it.
        rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|error| EnrollmentError::BadCsr(CaError::BadCsr(error)))?;
        let now = self.clock.now_unix();
        let record = match self.store.redeem_token(&hash_secret(&token.secret), now).await? {
            TokenRedemption::Redeemed(record) => record,
            TokenRedemption::Refused(refusal) => return Err(refusal.into()),
        };
        let machine_id = Uuid::new_v4();
        let identity = Identity::machine(self.trust_domain, machine_id);
        let certificate = self
            .ca
            .issue_client_from_csr(csr_pem, &identity, self.certificate_ttl)
            .map_err(csr_error)?;
        let machine = MachineRecord {
            id: machine_id,
            labels: record.labels,
            zone: record.zone,
            enrolled_at: now,
            enrolled_with_token: record.id,
            certificate_serial: certificate.serial_hex.clone(),
            certificate_not_after: to_unix(certificate.not_after),
            inventory: Inventory {
                hostname: hostname.to_owned(),
                ..Inventory::default()
            },
            last_seen: now,
            desired_version: 1,
        };
        self.store.insert_machine(&machine).await?;
        Ok(Enrolled {
            machine_id,
            identity,
            certificate,
        })
    }

    /// Re-issues a certificate to a machine that proves it held the key of its
    /// latest certificate, which has expired less than `reenroll_expired_within` ago.
    pub async fn reenroll(
        &self,
        expired_certificate_pem: &str,
        csr_pem: &str,
    ) -> Result<Enrolled, EnrollmentError> {
        let refused = |reason: String| EnrollmentError::ReenrollRefused(reason);
        let facts = self
            .ca
            .verify_ignoring_expiry(expired_certificate_pem)
            .map_err(|error| refused(error.to_string()))?;
        let identity: Identity = facts
            .identity_uri
            .as_deref()
            .ok_or_else(|| refused("certificate carries no identity".into()))?
            .parse()
            .map_err(|error: flotte_proto::identity::IdentityError| refused(error.to_string()))?;
        if identity.kind != IdentityKind::Machine || identity.trust_domain != self.trust_domain {
            return Err(refused(format!("{identity} is not a machine of this server")));
        }
        let machine_id = Uuid::parse_str(&identity.name).map_err(|error| refused(error.to_string()))?;
        let machine = self
            .store
            .machine(machine_id)
            .await?
            .ok_or_else(|| refused(format!("machine {machine_id} is not enrolled here")))?;
        if machine.certificate_serial != facts.serial_hex {
            return Err(refused(format!(
                "certificate serial {} is not the machine's latest ({}); enroll again with a join token",
                facts.serial_hex, machine.certificate_serial
            )));
        }
        let now = self.clock.now_unix();
        let window = i64::try_from(self.reenroll_expired_within.as_secs()).unwrap_or(i64::MAX);
        if now.saturating_sub(facts.not_after_unix) > window {
            return Err(refused(format!(
                "certificate expired at {} (unix), longer ago than the server allows ({}); enroll again with a join token",
                facts.not_after_unix,
                humantime::format_duration(self.reenroll_expired_within)
            )));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|error| EnrollmentError::BadCsr(CaError::BadCsr(error)))?;
        if rcgen::PublicKeyData::der_bytes(&csr.public_key) != facts.public_key_raw.as_slice() {
            return Err(refused(
                "the CSR's key is not the key of the expired certificate".into(),
            ));
        }
        let certificate = self
            .ca
            .issue_client_from_csr(csr_pem, &identity, self.certificate_ttl)
            .map_err(csr_error)?;
        self.store
            .record_certificate(machine_id, &certificate.serial_hex, to_unix(certificate.not_after))
            .await?;
        Ok(Enrolled {
            machine_id,
            identity,
            certificate,
        })
    }
}
