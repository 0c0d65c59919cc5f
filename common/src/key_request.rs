//! The key and certificate signing request of a new identity, made where the
//! identity will live: `flottectl operator create` makes an operator's key on
//! the machine that runs it, so the private key is never sent to the server.
//! The server's CA issues from the CSR's public key only.

use rcgen::{CertificateParams, KeyPair};

#[derive(Debug, thiserror::Error)]
#[error("key or certificate request generation failed: {0}")]
pub struct KeyRequestError(#[from] rcgen::Error);

/// A new ECDSA P-256 key and a CSR for it, both PEM: what a client that wants
/// a certificate sends (the CSR) and keeps (the key).
pub fn generate_key_and_csr() -> Result<(String, String), KeyRequestError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    Ok((key.serialize_pem(), csr))
}

/// A CSR for a key already held (PEM): what a renewal sends, so that the
/// identity keeps its key and only its certificate changes.
pub fn csr_for_key(key_pem: &str) -> Result<String, KeyRequestError> {
    let key = KeyPair::from_pem(key_pem)?;
    Ok(CertificateParams::default()
        .serialize_request(&key)?
        .pem()?)
}

#[cfg(test)]
mod tests {
    use rcgen::PublicKeyData;

    use super::*;

    #[test]
    fn the_request_is_signed_by_the_key_it_carries() {
        let (key_pem, csr_pem) = generate_key_and_csr().unwrap();
        let request = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(request.public_key.der_bytes(), key.der_bytes());
        let renewal = csr_for_key(&key_pem).unwrap();
        let renewal = rcgen::CertificateSigningRequestParams::from_pem(&renewal).unwrap();
        assert_eq!(renewal.public_key.der_bytes(), key.der_bytes(), "same key");
    }
}
