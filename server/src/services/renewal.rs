//! Certificate renewal for a connected machine, part of the enrollment
//! service: the CA issues a certificate for the machine's own identity from
//! the CSR the agent sent on its session, and the serial is recorded before
//! the answer leaves (the serial on file is what re-enrollment trusts).
//! What must never happen here: answering with a certificate whose serial
//! was not recorded, or for another key than the one the session was
//! opened with (a stolen session cannot move the identity to a new key),
//! or more often than [`min_renewal_interval`] on one session.

use std::time::Duration;

use flotte_proto::identity::Identity;
use uuid::Uuid;

use crate::ca::CaError;
use crate::clock::to_unix;
use crate::services::enrollment::Enroller;
use crate::store::{StoreError, UnixSeconds};

#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    /// The CSR was refused or the CA could not issue.
    #[error(transparent)]
    Refused(CaError),
    /// Issued, but not recorded: the certificate must not be sent.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the CSR's key is not the key of the certificate this session was opened with")]
    OtherKey,
    #[error("a renewal was answered on this session less than {} ago", humantime::format_duration(*.0))]
    TooSoon(Duration),
}

/// The least time between two renewals on one session: a quarter of the
/// certificate lifetime (an honest agent renews at two thirds of it), at
/// least a second.
pub fn min_renewal_interval(certificate_ttl: Duration) -> Duration {
    (certificate_ttl / 4).max(Duration::from_secs(1))
}

/// A renewed machine certificate, recorded and ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewedCertificate {
    pub certificate_pem: String,
    pub serial_hex: String,
    pub not_after: UnixSeconds,
}

impl Enroller<'_> {
    /// Issues `machine_id` a new certificate from `csr_pem` for the key of
    /// its session's certificate (`session_key_raw`) and records its
    /// serial; the certificate is returned only once recorded.
    pub async fn renew(
        &self,
        machine_id: Uuid,
        csr_pem: &str,
        session_key_raw: &[u8],
    ) -> Result<RenewedCertificate, RenewalError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|error| RenewalError::Refused(CaError::BadCsr(error)))?;
        if rcgen::PublicKeyData::der_bytes(&csr.public_key) != session_key_raw {
            return Err(RenewalError::OtherKey);
        }
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
    use super::*;
    use crate::services::enrollment::tests::{key_and_csr, Fixture};
    use crate::store::Store;

    #[tokio::test]
    async fn a_renewal_is_recorded_before_it_is_returned_and_a_bad_csr_changes_nothing() {
        let fixture = Fixture::new();
        let (_, csr, enrolled) = fixture.enroll_web_1().await;
        let machine_id = enrolled.machine_id;
        let session_key = rcgen::PublicKeyData::der_bytes(
            &rcgen::CertificateSigningRequestParams::from_pem(&csr)
                .unwrap()
                .public_key,
        )
        .to_vec();

        let refused = fixture
            .enroller()
            .renew(machine_id, "not a CSR", &session_key)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, RenewalError::Refused(CaError::BadCsr(_))),
            "{refused}"
        );
        // A CSR for another key than the session's: refused, nothing recorded.
        let (_, other_csr) = key_and_csr();
        let refused = fixture
            .enroller()
            .renew(machine_id, &other_csr, &session_key)
            .await
            .unwrap_err();
        assert!(matches!(refused, RenewalError::OtherKey), "{refused}");
        let renewed = fixture
            .enroller()
            .renew(machine_id, &csr, &session_key)
            .await
            .unwrap();

        let machine = fixture.store.machine(machine_id).await.unwrap().unwrap();
        assert!(renewed.certificate_pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(machine.certificate_serial, renewed.serial_hex);
        assert_eq!(
            machine.previous_certificate_serial, enrolled.certificate.serial_hex,
            "the refused renewals recorded nothing; the enrolled serial became the previous one"
        );
        assert_eq!(machine.certificate_not_after, renewed.not_after);
    }

    #[test]
    fn renewals_are_spaced_by_a_quarter_of_the_lifetime() {
        assert_eq!(
            min_renewal_interval(Duration::from_secs(24 * 3600)),
            Duration::from_secs(6 * 3600)
        );
        assert_eq!(
            min_renewal_interval(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
    }
}
