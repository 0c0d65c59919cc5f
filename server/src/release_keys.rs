//! Trusted release keys: the ed25519 public keys whose signatures on image
//! manifests the server will accept (images arrive in a later issue).
//!
//! This module only parses and names keys — pure functions, no storage.
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
