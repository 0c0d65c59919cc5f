//! Certificate renewal for a connected machine: the CA issues a certificate
//! for the machine's own identity from the CSR the agent sent on its
//! session, and the serial is recorded before the answer leaves (the serial
//! on file is what re-enrollment trusts). What must never happen here:
//! answering with a certificate whose serial was not recorded.

use std::time::Duration;

use flotte_proto::identity::Identity;
use uuid::Uuid;

use crate::ca::{CaError, CertificateAuthority};
use crate::clock::to_unix;
use crate::store::{Store, StoreError, UnixSeconds};
use crate::ServerState;

#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    /// The CSR was refused or the CA could not issue.
    #[error(transparent)]
    Refused(CaError),
    /// Issued, but not recorded: the certificate must not be sent.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A renewed machine certificate, recorded and ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewedCertificate {
    pub certificate_pem: String,
    pub serial_hex: String,
    pub not_after: UnixSeconds,
}

/// What renewal needs from the server: the CA, the store, and the policy of
/// what it issues.
pub struct Renewer<'a> {
    pub ca: &'a CertificateAuthority,
    pub store: &'a dyn Store,
    pub trust_domain: &'a str,
    pub certificate_ttl: Duration,
}

impl<'a> Renewer<'a> {
    pub fn of(state: &'a ServerState) -> Self {
        Renewer {
            ca: &state.ca,
            store: state.store.as_ref(),
            trust_domain: &state.config.trust_domain,
            certificate_ttl: state.config.machine_certificate_ttl,
        }
    }

    /// Issues `machine_id` a new certificate from `csr_pem` and records its
    /// serial; the certificate is returned only once recorded.
    pub async fn renew(
        &self,
        machine_id: Uuid,
        csr_pem: &str,
    ) -> Result<RenewedCertificate, RenewalError> {
        let identity = Identity::machine(self.trust_domain, machine_id);
        let issued = self
            .ca
            .issue_client_from_csr(csr_pem, &identity, self.certificate_ttl)
            .map_err(RenewalError::Refused)?;
        let not_after = to_unix(issued.not_after);
        self.store
            .record_certificate(machine_id, &issued.serial_hex, not_after)
            .await?;
        tracing::info!(machine = %machine_id, serial = %issued.serial_hex, not_after, "machine certificate renewed");
        Ok(RenewedCertificate {
            certificate_pem: issued.certificate_pem,
            serial_hex: issued.serial_hex,
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::store::{Inventory, MachineRecord, SqliteStore};

    struct Fixture {
        dir: PathBuf,
        ca: CertificateAuthority,
        store: SqliteStore,
        machine_id: Uuid,
    }

    impl Fixture {
        async fn with_enrolled_machine() -> Self {
            let dir = std::env::temp_dir().join(format!("flotte-renew-test-{}", Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            let store = SqliteStore::open(&dir.join("db")).unwrap();
            let machine_id = Uuid::new_v4();
            store
                .insert_machine(&MachineRecord {
                    id: machine_id,
                    labels: Default::default(),
                    zone: "dc1".into(),
                    enrolled_at: 0,
                    enrolled_with_token: "aa".into(),
                    certificate_serial: "01".into(),
                    previous_certificate_serial: String::new(),
                    certificate_not_after: 0,
                    inventory: Inventory::default(),
                    last_seen: 0,
                    desired_version: 0,
                    state: "healthy".into(),
                    state_reason: String::new(),
                    state_since: 0,
                    retired_at: None,
                    desired_image: None,
                })
                .await
                .unwrap();
            Fixture {
                ca: CertificateAuthority::create(&dir, "td").unwrap(),
                store,
                machine_id,
                dir,
            }
        }

        fn renewer(&self) -> Renewer<'_> {
            Renewer {
                ca: &self.ca,
                store: &self.store,
                trust_domain: "td",
                certificate_ttl: Duration::from_secs(60),
            }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn a_renewal_is_recorded_before_it_is_returned() {
        let fixture = Fixture::with_enrolled_machine().await;
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let renewed = fixture
            .renewer()
            .renew(fixture.machine_id, &csr)
            .await
            .unwrap();
        assert!(renewed.certificate_pem.contains("BEGIN CERTIFICATE"));
        let machine = fixture
            .store
            .machine(fixture.machine_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(machine.certificate_serial, renewed.serial_hex);
        assert_eq!(machine.previous_certificate_serial, "01");
        assert_eq!(machine.certificate_not_after, renewed.not_after);
    }

    #[tokio::test]
    async fn a_bad_csr_is_refused_and_nothing_is_recorded() {
        let fixture = Fixture::with_enrolled_machine().await;
        let error = fixture
            .renewer()
            .renew(fixture.machine_id, "not a CSR")
            .await
            .unwrap_err();
        assert!(
            matches!(error, RenewalError::Refused(CaError::BadCsr(_))),
            "{error}"
        );
        let machine = fixture
            .store
            .machine(fixture.machine_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(machine.certificate_serial, "01");
    }
}
