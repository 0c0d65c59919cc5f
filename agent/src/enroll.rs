//! First contact with the server: enrollment with a join token over TLS pinned
//! to the CA fingerprint the token carries, and re-enrollment with an expired
//! certificate over TLS trusting the CA learned at enrollment.
//!
//! Nothing is written to disk here; the caller saves the identity only after
//! everything succeeded, so a refused enrollment leaves no trace.

use std::sync::{Arc, Mutex};

use flotte_proto::join_token::JoinToken;
use flotte_proto::transport::{
    channel_with_diagnostics, client_config, crypto_provider, explain_status_with, TlsDiagnostics,
};
use flotte_proto::v1::enrollment_client::EnrollmentClient;
use flotte_proto::v1::{EnrollRequest, EnrollResponse, ReenrollRequest};
use ring::digest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::identity::{csr_for, generate_key, IdentityError, MachineIdentity};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the server at {address} is not the one the join token was made for: its CA fingerprint is sha256:{presented}, the token expects sha256:{expected}")]
    FingerprintMismatch {
        address: String,
        expected: String,
        presented: String,
    },
    #[error("enrollment refused by {address}: {reason}")]
    Refused { address: String, reason: String },
    #[error("cannot reach {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("the server's answer is unusable: {0}")]
    BadResponse(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Transport(#[from] flotte_proto::transport::TransportError),
}

impl EnrollError {
    /// Whether trying again (or another server) could succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, EnrollError::Unreachable { .. })
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

/// Verifies the server's chain against the one CA certificate in it whose
/// SHA-256 matches the join token, and records what it saw on mismatch.
#[derive(Debug)]
struct PinnedCaVerifier {
    expected_fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Fingerprints presented by the server when none matched.
    mismatch: Mutex<Option<String>>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|certificate| sha256_hex(certificate) == self.expected_fingerprint)
        else {
            let presented = intermediates
                .iter()
                .map(|certificate| sha256_hex(certificate))
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(mut slot) = self.mismatch.lock() {
                *slot = Some(if presented.is_empty() {
                    "(no CA certificate sent)".to_owned()
                } else {
                    presented
                });
            }
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|error| rustls::Error::General(error.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn pinned_client_config(
    verifier: Arc<PinnedCaVerifier>,
) -> Result<rustls::ClientConfig, EnrollError> {
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(flotte_proto::transport::TransportError::from)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn classify_status(
    address: &str,
    status: &tonic::Status,
    diagnostics: &TlsDiagnostics,
) -> EnrollError {
    match status.code() {
        tonic::Code::PermissionDenied
        | tonic::Code::InvalidArgument
        | tonic::Code::Unauthenticated => EnrollError::Refused {
            address: address.to_owned(),
            reason: status.message().to_owned(),
        },
        _ => EnrollError::Unreachable {
            address: address.to_owned(),
            reason: explain_status_with(status, diagnostics),
        },
    }
}

/// Builds the identity from the server's answer, checking that the CA it
/// returned is the one we pinned and that the certificate is for our key.
fn identity_from_response(
    key_pem: String,
    response: EnrollResponse,
    expected_ca_fingerprint: Option<&str>,
) -> Result<MachineIdentity, EnrollError> {
    if let Some(expected) = expected_ca_fingerprint {
        let ca = flotte_proto::transport::certificates_from_pem(
            "CA certificate from the server",
            &response.ca_certificate_pem,
        )?;
        if ca.first().map(|der| sha256_hex(der)).as_deref() != Some(expected) {
            return Err(EnrollError::BadResponse(
                "the CA certificate returned does not match the join token's fingerprint".into(),
            ));
        }
    }
    let identity = MachineIdentity::from_parts(
        key_pem,
        response.certificate_pem,
        response.ca_certificate_pem,
    )?;
    if identity.machine_id.to_string() != response.machine_id {
        return Err(EnrollError::BadResponse(format!(
            "certificate names machine {} but the server said {}",
            identity.machine_id, response.machine_id
        )));
    }
    Ok(identity)
}

/// Enrolls with one server: generates a key, sends a CSR with the token.
pub async fn enroll(
    address: &str,
    token: &JoinToken,
    hostname: &str,
) -> Result<MachineIdentity, EnrollError> {
    let verifier = Arc::new(PinnedCaVerifier {
        expected_fingerprint: token.ca_fingerprint.clone(),
        provider: crypto_provider(),
        mismatch: Mutex::new(None),
    });
    let tls = pinned_client_config(Arc::clone(&verifier))?;
    let (channel, diagnostics) = channel_with_diagnostics(address, Arc::new(tls))?;
    let mut client = EnrollmentClient::new(channel);
    let key_pem = generate_key()?;
    let request = EnrollRequest {
        join_token: token.to_string(),
        csr_pem: csr_for(&key_pem)?,
        hostname: hostname.to_owned(),
    };
    let response = match client.enroll(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let mismatch = verifier.mismatch.lock().ok().and_then(|slot| slot.clone());
            if let Some(presented) = mismatch {
                return Err(EnrollError::FingerprintMismatch {
                    address: address.to_owned(),
                    expected: token.ca_fingerprint.clone(),
                    presented,
                });
            }
            return Err(classify_status(address, &status, &diagnostics));
        }
    };
    identity_from_response(key_pem, response, Some(&token.ca_fingerprint))
}

/// Re-enrolls a machine whose certificate expired: proves possession of the
/// same key with a fresh CSR, trusting the CA learned at enrollment.
pub async fn reenroll(
    address: &str,
    expired: &MachineIdentity,
) -> Result<MachineIdentity, EnrollError> {
    let tls = client_config(&expired.ca_pem, None)?;
    let (channel, diagnostics) = channel_with_diagnostics(address, Arc::new(tls))?;
    let mut client = EnrollmentClient::new(channel);
    let request = ReenrollRequest {
        expired_certificate_pem: expired.certificate_pem.clone(),
        csr_pem: csr_for(&expired.key_pem)?,
    };
    let response = client
        .reenroll(request)
        .await
        .map_err(|status| classify_status(address, &status, &diagnostics))?
        .into_inner();
    let renewed = identity_from_response(expired.key_pem.clone(), response, None)?;
    if renewed.identity != expired.identity {
        return Err(EnrollError::BadResponse(format!(
            "re-enrollment returned {} instead of {}",
            renewed.identity, expired.identity
        )));
    }
    Ok(renewed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_enrollment_is_retried_and_a_refused_one_is_not() {
        let diagnostics = TlsDiagnostics::default();
        let busy = tonic::Status::resource_exhausted("enrollment rate limit: try again later");
        assert!(classify_status("server:1", &busy, &diagnostics).is_transient());
        let refused = tonic::Status::permission_denied("join token expired");
        let error = classify_status("server:1", &refused, &diagnostics);
        assert!(!error.is_transient());
        assert!(error.to_string().contains("join token expired"), "{error}");
    }
}
