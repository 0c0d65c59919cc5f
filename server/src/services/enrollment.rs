//! Enrollment and re-enrollment: turning a join token (or an expired but
//! genuine certificate) plus a CSR into a machine identity.
//!
//! The machine's private key never reaches the server: we only ever see a CSR,
//! whose self-signature proves possession of the key.

use std::time::Duration;

use flotte_proto::identity::{Identity, IdentityKind};
use flotte_proto::join_token::JoinToken;
use uuid::Uuid;

use crate::ca::{CaError, CertificateAuthority, IssuedCertificate};
use crate::clock::{to_unix, Clock};
use crate::join_tokens::hash_secret;
use crate::store::{
    DeniedKind, Inventory, MachineRecord, Store, StoreError, TokenRedemption, TokenRefusal,
};
use crate::ServerState;

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

impl<'a> Enroller<'a> {
    /// The enroller of a running server: its CA, store and clock, and the
    /// certificate policy of its configuration.
    pub fn of(state: &'a ServerState) -> Self {
        Enroller {
            ca: &state.ca,
            store: state.store.as_ref(),
            clock: state.clock.as_ref(),
            trust_domain: &state.config.trust_domain,
            certificate_ttl: state.config.machine_certificate_ttl,
            reenroll_expired_within: state.config.reenroll_expired_within,
        }
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
        let record = match self
            .store
            .redeem_token(&hash_secret(&token.secret), now)
            .await?
        {
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
            previous_certificate_serial: String::new(),
            certificate_not_after: to_unix(certificate.not_after),
            inventory: Inventory {
                hostname: hostname.to_owned(),
                ..Inventory::default()
            },
            last_seen: now,
            desired_version: 1,
            state: crate::domain::health::MachineState::Unknown
                .as_str()
                .to_owned(),
            state_reason: "enrolled; no report yet".to_owned(),
            state_since: now,
            retired_at: None,
            desired_image: None,
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
            return Err(refused(format!(
                "{identity} is not a machine of this server"
            )));
        }
        let machine_id =
            Uuid::parse_str(&identity.name).map_err(|error| refused(error.to_string()))?;
        let machine = self
            .store
            .machine(machine_id)
            .await?
            .ok_or_else(|| refused(format!("machine {machine_id} is not enrolled here")))?;
        // Defence in depth: the handshake never sees an expired certificate
        // here (re-enrollment is anonymous), so the deny list is read too.
        let denied = self.store.denied_entries().await?;
        if let Some(entry) = denied.iter().find(|entry| match entry.kind {
            DeniedKind::Serial => entry.value == facts.serial_hex,
            DeniedKind::Identity => facts.identity_uri.as_deref() == Some(entry.value.as_str()),
        }) {
            return Err(refused(format!(
                "the certificate is on the deny list ({}); enroll again with a new join token",
                entry.reason
            )));
        }
        if machine.retired_at.is_some() {
            return Err(refused(format!(
                "machine {machine_id} was decommissioned; enroll it again with a new join token"
            )));
        }
        let is_latest = machine.certificate_serial == facts.serial_hex;
        let is_previous = !machine.previous_certificate_serial.is_empty()
            && machine.previous_certificate_serial == facts.serial_hex;
        if !is_latest && !is_previous {
            return Err(refused(format!(
                "certificate serial {} is not the machine's latest ({}); enroll again with a join token",
                facts.serial_hex, machine.certificate_serial
            )));
        }
        let now = self.clock.now_unix();
        let window = i64::try_from(self.reenroll_expired_within.as_secs()).unwrap_or(i64::MAX);
        if now.saturating_sub(facts.not_after_unix) > window {
            return Err(refused(format!(
                "certificate expired at {}, longer ago than the server allows ({}); enroll again with a join token",
                crate::store::rfc3339(facts.not_after_unix),
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
            .record_certificate(
                machine_id,
                &certificate.serial_hex,
                to_unix(certificate.not_after),
            )
            .await?;
        Ok(Enrolled {
            machine_id,
            identity,
            certificate,
        })
    }
}

/// The fixture is shared with the renewal tests (`services::renewal`),
/// which renew certificates of machines enrolled here.
#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::time::SystemTime;

    use super::*;
    use crate::store::{JoinTokenRecord, SqliteStore};

    struct FixedClock(Mutex<SystemTime>);

    impl Clock for FixedClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }

    pub(crate) struct Fixture {
        dir: PathBuf,
        ca: CertificateAuthority,
        pub(crate) store: SqliteStore,
        clock: FixedClock,
    }

    impl Fixture {
        pub(crate) fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("flotte-enroll-test-{}", Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            Fixture {
                ca: CertificateAuthority::create(&dir, "td").unwrap(),
                store: SqliteStore::open(&dir.join("db")).unwrap(),
                clock: FixedClock(Mutex::new(SystemTime::now())),
                dir,
            }
        }

        pub(crate) fn enroller(&self) -> Enroller<'_> {
            Enroller {
                ca: &self.ca,
                store: &self.store,
                clock: &self.clock,
                trust_domain: "td",
                certificate_ttl: Duration::from_secs(60),
                reenroll_expired_within: Duration::from_secs(3600),
            }
        }

        pub(crate) async fn token(&self, secret: &str) -> String {
            self.store
                .insert_token(&JoinTokenRecord {
                    id: "aa".into(),
                    secret_hash: hash_secret(secret),
                    labels: [("role".to_owned(), "web".to_owned())].into(),
                    zone: "dc1".into(),
                    created_at: 0,
                    expires_at: i64::MAX,
                    uses_allowed: 1,
                    uses_done: 0,
                    revoked: false,
                })
                .await
                .unwrap();
            JoinToken {
                id: "aa".into(),
                secret: secret.into(),
                ca_fingerprint: self.ca.fingerprint(),
            }
            .to_string()
        }

        fn advance(&self, by: Duration) {
            *self.clock.0.lock().unwrap() += by;
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    pub(crate) fn key_and_csr() -> (rcgen::KeyPair, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        (key, csr)
    }

    impl Fixture {
        /// Enrolls `web-1` with a single-use token; returns the spent token
        /// and the CSR with what enrollment issued.
        pub(crate) async fn enroll_web_1(&self) -> (String, String, Enrolled) {
            let token = self.token("beef").await;
            let (_, csr) = key_and_csr();
            let enrolled = self.enroller().enroll(&token, &csr, "web-1").await.unwrap();
            (token, csr, enrolled)
        }
    }

    #[tokio::test]
    async fn enrollment_takes_labels_from_the_token_and_refuses_reuse() {
        let fixture = Fixture::new();
        let (token, csr, enrolled) = fixture.enroll_web_1().await;
        let machine = fixture
            .store
            .machine(enrolled.machine_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(machine.labels["role"], "web");
        assert_eq!(machine.zone, "dc1");
        assert_eq!(machine.certificate_serial, enrolled.certificate.serial_hex);
        let again = fixture
            .enroller()
            .enroll(&token, &csr, "web-2")
            .await
            .unwrap_err();
        assert!(again.to_string().contains("already been used"), "{again}");
        let garbage = fixture
            .enroller()
            .enroll(&token, "not a csr", "x")
            .await
            .unwrap_err();
        assert!(matches!(garbage, EnrollmentError::BadCsr(_)), "{garbage}");
    }

    #[tokio::test]
    async fn reenrollment_accepts_only_a_recent_latest_certificate_for_the_same_key() {
        let fixture = Fixture::new();
        let token = fixture.token("cafe").await;
        let (key, csr) = key_and_csr();
        let first = fixture
            .enroller()
            .enroll(&token, &csr, "web-1")
            .await
            .unwrap();
        let first_pem = first.certificate.certificate_pem.clone();

        // Expired a little: accepted, and the machine keeps its id.
        fixture.advance(Duration::from_secs(120));
        let second = fixture.enroller().reenroll(&first_pem, &csr).await.unwrap();
        assert_eq!(second.machine_id, first.machine_id);
        // The previous certificate is still accepted once (lost renewal answer)...
        let third = fixture.enroller().reenroll(&first_pem, &csr).await.unwrap();
        // ...but not after another renewal made it two generations old.
        let stale = fixture
            .enroller()
            .reenroll(&first_pem, &csr)
            .await
            .unwrap_err();
        assert!(
            stale.to_string().contains("not the machine's latest"),
            "{stale}"
        );

        // Another key cannot ride on the certificate.
        let (_, other_csr) = key_and_csr();
        let wrong_key = fixture
            .enroller()
            .reenroll(&third.certificate.certificate_pem, &other_csr)
            .await
            .unwrap_err();
        assert!(wrong_key.to_string().contains("not the key"), "{wrong_key}");

        // Expired too long ago.
        fixture.advance(Duration::from_secs(2 * 3600));
        let too_old = fixture
            .enroller()
            .reenroll(&third.certificate.certificate_pem, &csr)
            .await
            .unwrap_err();
        assert!(
            too_old
                .to_string()
                .contains("longer ago than the server allows"),
            "{too_old}"
        );

        // A certificate from another CA.
        let other_dir = fixture.dir.join("other");
        std::fs::create_dir_all(&other_dir).unwrap();
        let other_ca = CertificateAuthority::create(&other_dir, "td").unwrap();
        let foreign = other_ca
            .issue_client_from_csr(
                &csr,
                &Identity::machine("td", first.machine_id),
                Duration::from_secs(1),
            )
            .unwrap();
        let refused = fixture
            .enroller()
            .reenroll(&foreign.certificate_pem, &csr)
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("not issued by this CA"),
            "{refused}"
        );
        drop(key);
    }

    #[tokio::test]
    async fn a_denied_certificate_cannot_reenroll() {
        let fixture = Fixture::new();
        let (_, csr, enrolled) = fixture.enroll_web_1().await;
        fixture.advance(Duration::from_secs(120));
        fixture
            .store
            .retire_machine(
                enrolled.machine_id,
                1,
                &[crate::store::DeniedEntry {
                    kind: DeniedKind::Serial,
                    value: enrolled.certificate.serial_hex.clone(),
                    reason: "stolen laptop".into(),
                    denied_at: 1,
                }],
            )
            .await
            .unwrap();
        let refused = fixture
            .enroller()
            .reenroll(&enrolled.certificate.certificate_pem, &csr)
            .await
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("on the deny list (stolen laptop)"),
            "{refused}"
        );
    }
}
