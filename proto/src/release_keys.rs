//! Release keys: the ed25519 keys that sign image manifests. The server and
//! the agent trust only the public keys they were given; `flottectl image
//! keygen` makes a pair and `image build` signs with the private half.
//!
//! This module parses, names, generates, signs and verifies — pure functions
//! and files, no storage.
//! Accepted key file formats (one key per file; blank lines and `#` comments
//! are ignored):
//! * an OpenSSH public key line: `ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI… comment`
//! * the raw 32-byte public key in base64 (44 characters with padding)
//! * the raw 32-byte public key in hex (64 characters)
//!
//! A private key is refused with a message saying so: it must never be sent.

use base64::Engine;
use ring::digest;

pub const ED25519_PUBLIC_KEY_LENGTH: usize = 32;
const OPENSSH_ED25519: &str = "ssh-ed25519";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseKeyError {
    #[error("the key file is empty")]
    Empty,
    #[error(
        "this is a private key: give the public key (e.g. the .pub file), never the private one"
    )]
    PrivateKey,
    #[error("the key file holds more than one key; give one key per file")]
    SeveralKeys,
    #[error("unsupported key type {0:?}: only ssh-ed25519 keys can sign releases")]
    UnsupportedType(String),
    #[error("the OpenSSH key data is not valid base64: {0}")]
    BadBase64(String),
    #[error("the OpenSSH key blob is malformed: {0}")]
    BadBlob(String),
    #[error("an ed25519 public key is 32 bytes; this one is {0}")]
    WrongLength(usize),
    #[error("not a recognised public key: expected an `ssh-ed25519 AAAA…` line, or the raw 32-byte key in base64 or hex")]
    Unrecognised,
}

/// A parsed ed25519 release public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasePublicKey {
    pub key: [u8; ED25519_PUBLIC_KEY_LENGTH],
    /// The OpenSSH comment, if the file had one (a default name).
    pub comment: String,
}

impl ReleasePublicKey {
    /// Stable id: lowercase hex SHA-256 of the raw key.
    pub fn id(&self) -> String {
        hex::encode(digest::digest(&digest::SHA256, &self.key))
    }

    /// The raw key in standard base64 (the canonical stored form).
    pub fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.key)
    }

    /// The key as an OpenSSH public key line (for display and export).
    pub fn openssh_line(&self) -> String {
        let mut blob = Vec::with_capacity(51);
        for part in [OPENSSH_ED25519.as_bytes(), &self.key] {
            blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
            blob.extend_from_slice(part);
        }
        format!(
            "{OPENSSH_ED25519} {}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }
}

fn exact_key(bytes: &[u8]) -> Result<[u8; ED25519_PUBLIC_KEY_LENGTH], ReleaseKeyError> {
    bytes
        .try_into()
        .map_err(|_| ReleaseKeyError::WrongLength(bytes.len()))
}

/// Reads one length-prefixed string of an OpenSSH blob.
fn blob_string<'a>(blob: &mut &'a [u8]) -> Result<&'a [u8], ReleaseKeyError> {
    let malformed = || ReleaseKeyError::BadBlob("truncated".into());
    let (length, rest) = blob.split_first_chunk::<4>().ok_or_else(malformed)?;
    let length = u32::from_be_bytes(*length) as usize;
    if rest.len() < length {
        return Err(malformed());
    }
    let (value, rest) = rest.split_at(length);
    *blob = rest;
    Ok(value)
}

fn parse_openssh(data: &str, comment: &str) -> Result<ReleasePublicKey, ReleaseKeyError> {
    let blob = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|error| ReleaseKeyError::BadBase64(error.to_string()))?;
    let mut rest = blob.as_slice();
    let inner_type = blob_string(&mut rest)?;
    if inner_type != OPENSSH_ED25519.as_bytes() {
        return Err(ReleaseKeyError::BadBlob(format!(
            "the blob says {:?}, the line says ssh-ed25519",
            String::from_utf8_lossy(inner_type)
        )));
    }
    let key = exact_key(blob_string(&mut rest)?)?;
    if !rest.is_empty() {
        return Err(ReleaseKeyError::BadBlob("trailing bytes".into()));
    }
    Ok(ReleasePublicKey {
        key,
        comment: comment.to_owned(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("the signing key is not an ed25519 PKCS#8 private key (PEM): {0}")]
    Invalid(String),
    #[error("the system random number generator failed")]
    Random,
}

const PRIVATE_KEY_PEM_LABEL: &str = "PRIVATE KEY";

/// A new ed25519 key pair: the private key as PKCS#8 PEM (keep it secret,
/// mode 0600) and its public key.
pub fn generate_signing_key() -> Result<(String, ReleasePublicKey), SigningKeyError> {
    let random = ring::rand::SystemRandom::new();
    let document = ring::signature::Ed25519KeyPair::generate_pkcs8(&random)
        .map_err(|_| SigningKeyError::Random)?;
    let private_pem = pem_encode(PRIVATE_KEY_PEM_LABEL, document.as_ref());
    let public = signing_key_from_pem(&private_pem)?.1;
    Ok((private_pem, public))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

fn pem_decode(label: &str, text: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = text[start..].find(&end)? + start;
    let body: String = text[start..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Loads a private key written by [`generate_signing_key`].
pub fn signing_key_from_pem(
    text: &str,
) -> Result<(ring::signature::Ed25519KeyPair, ReleasePublicKey), SigningKeyError> {
    use ring::signature::KeyPair;
    let der = pem_decode(PRIVATE_KEY_PEM_LABEL, text)
        .ok_or_else(|| SigningKeyError::Invalid("no PRIVATE KEY PEM block".into()))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|error| SigningKeyError::Invalid(error.to_string()))?;
    let key = exact_key(pair.public_key().as_ref())
        .map_err(|error| SigningKeyError::Invalid(error.to_string()))?;
    Ok((
        pair,
        ReleasePublicKey {
            key,
            comment: String::new(),
        },
    ))
}

impl ReleasePublicKey {
    /// Whether `signature` is this key's ed25519 signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, self.key)
            .verify(message, signature)
            .is_ok()
    }
}

/// Parses a release key file in one of the formats above.
pub fn parse_release_key(text: &str) -> Result<ReleasePublicKey, ReleaseKeyError> {
    if text.contains("PRIVATE KEY") {
        return Err(ReleaseKeyError::PrivateKey);
    }
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'));
    let line = lines.next().ok_or(ReleaseKeyError::Empty)?;
    if lines.next().is_some() {
        return Err(ReleaseKeyError::SeveralKeys);
    }
    let mut words = line.split_whitespace();
    let first = words.next().ok_or(ReleaseKeyError::Empty)?;
    if first.starts_with("ssh-") || first.starts_with("ecdsa-") || first.starts_with("sk-") {
        if first != OPENSSH_ED25519 {
            return Err(ReleaseKeyError::UnsupportedType(first.to_owned()));
        }
        let data = words
            .next()
            .ok_or_else(|| ReleaseKeyError::BadBlob("no key data after ssh-ed25519".into()))?;
        let comment = words.collect::<Vec<_>>().join(" ");
        return parse_openssh(data, &comment);
    }
    if words.next().is_some() {
        return Err(ReleaseKeyError::Unrecognised);
    }
    // Hex first: base64 of 32 bytes ends in '=', so it is never all hex digits.
    let raw = if first.len() % 2 == 0 && first.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        hex::decode(first).map_err(|_| ReleaseKeyError::Unrecognised)?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(first)
            .map_err(|_| ReleaseKeyError::Unrecognised)?
    };
    Ok(ReleasePublicKey {
        key: exact_key(&raw)?,
        comment: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];

    fn openssh(comment: &str) -> String {
        let line = ReleasePublicKey {
            key: KEY,
            comment: String::new(),
        }
        .openssh_line();
        format!("{line} {comment}")
    }

    #[test]
    fn accepted_formats_yield_the_same_key() {
        let base64 = base64::engine::general_purpose::STANDARD.encode(KEY);
        let cases = [
            (openssh("release@ci"), "release@ci"),
            (format!("# our release key\n\n{}\n", openssh("")), ""),
            (base64.clone(), ""),
            (format!("{base64}\n"), ""),
            (hex::encode(KEY), ""),
        ];
        for (text, comment) in cases {
            let parsed = parse_release_key(&text).unwrap_or_else(|error| panic!("{text}: {error}"));
            assert_eq!(parsed.key, KEY, "{text}");
            assert_eq!(parsed.comment, comment, "{text}");
            assert_eq!(parsed.id().len(), 64);
        }
    }

    #[test]
    fn generated_keys_sign_and_verify_and_round_trip_as_files() {
        let (private_pem, public) = generate_signing_key().unwrap();
        let (pair, loaded_public) = signing_key_from_pem(&private_pem).unwrap();
        assert_eq!(loaded_public.key, public.key);
        let signature = pair.sign(b"manifest");
        assert!(public.verifies(b"manifest", signature.as_ref()));
        assert!(!public.verifies(b"manifest!", signature.as_ref()));
        let reparsed = parse_release_key(&public.openssh_line()).unwrap();
        assert_eq!(reparsed.key, public.key);
        assert!(signing_key_from_pem("garbage").is_err());
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases = [
            ("", "empty"),
            ("# only a comment\n", "empty"),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----",
                "private key",
            ),
            ("ssh-rsa AAAAB3NzaC1yc2E= me", "unsupported key type"),
            ("ssh-ed25519 !!!", "not valid base64"),
            ("ssh-ed25519 AAAAC3NzaC1yc2E=", "malformed"),
            (
                &format!("{}\n{}", openssh("a"), openssh("b")),
                "more than one key",
            ),
            (&hex::encode([1u8; 16]), "is 16"),
            ("hello world", "not a recognised public key"),
            ("not-base64-at-all!", "not a recognised public key"),
        ];
        for (text, expected) in cases {
            let error = parse_release_key(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        // An OpenSSH blob naming another key type inside an ed25519 line.
        let mut blob = Vec::new();
        for part in [b"ssh-rsa".as_slice(), &KEY] {
            blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
            blob.extend_from_slice(part);
        }
        let line = format!(
            "ssh-ed25519 {}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        );
        assert!(parse_release_key(&line)
            .unwrap_err()
            .to_string()
            .contains("the blob says"));
    }
}
