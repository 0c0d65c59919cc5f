//! OpenSSH public keys of people: parsing and validating `.pub` lines
//! (`type base64 [comment]`), `SHA256:` fingerprints as `ssh-keygen -l`
//! prints them, and finding the key in an `authorized_keys` line (which may
//! start with options).
//!
//! Pure functions only, shared by the server (validating what operators
//! add), flottectl and the agent (reading what is on disk). Nothing here
//! touches files; a private key or garbage is refused with the reason.

use base64::Engine;

/// Key types sshd accepts for people, as written in `.pub` files.
pub const ACCEPTED_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// RSA keys shorter than this are refused (OpenSSH refuses < 1024; 2048 is
/// the floor anyone should still use).
pub const MINIMUM_RSA_BITS: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshKeyError {
    #[error("the SSH public key is empty")]
    Empty,
    #[error("this is a private key: give the public key (the .pub file)")]
    PrivateKey,
    #[error("key type {0:?} is not accepted (expected one of: ssh-ed25519, ecdsa-sha2-nistp256/384/521, ssh-rsa, sk-ssh-ed25519@openssh.com, sk-ecdsa-sha2-nistp256@openssh.com)")]
    UnknownType(String),
    #[error("the key line has a type but no key data (expected `type base64 [comment]`)")]
    MissingData,
    #[error("the key data is not valid base64: {0}")]
    Base64(String),
    #[error("the key data is truncated or malformed ({0})")]
    Malformed(&'static str),
    #[error("the line says {line:?} but the key data is a {embedded:?} key")]
    TypeMismatch { line: String, embedded: String },
    #[error("{0}")]
    Invalid(String),
    #[error("the public key holds several lines: give one key per --ssh-key")]
    SeveralLines,
}

/// A validated OpenSSH public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshPublicKey {
    pub key_type: String,
    /// The key blob, standard base64 (as in the `.pub` file).
    pub data_base64: String,
    pub comment: String,
    blob: Vec<u8>,
}

impl SshPublicKey {
    /// `SHA256:<unpadded base64 of SHA-256(blob)>`, like `ssh-keygen -l`.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_blob(&self.blob)
    }

    /// `type base64`, the identity of the key without its comment.
    pub fn key_text(&self) -> String {
        format!("{} {}", self.key_type, self.data_base64)
    }

    /// `type base64 comment` (no trailing comment if empty).
    pub fn openssh_line(&self) -> String {
        if self.comment.is_empty() {
            self.key_text()
        } else {
            format!("{} {}", self.key_text(), self.comment)
        }
    }
}

fn fingerprint_of_blob(blob: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, blob);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest.as_ref())
    )
}

/// Reads one SSH wire-format `string` (u32 big-endian length, bytes).
fn take_string<'a>(blob: &mut &'a [u8]) -> Result<&'a [u8], SshKeyError> {
    if blob.len() < 4 {
        return Err(SshKeyError::Malformed("length field cut short"));
    }
    let length = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
    let rest = &blob[4..];
    if rest.len() < length {
        return Err(SshKeyError::Malformed("field longer than the key data"));
    }
    let (field, after) = rest.split_at(length);
    *blob = after;
    Ok(field)
}

fn expect_curve(blob: &mut &[u8], expected: &str) -> Result<(), SshKeyError> {
    let curve = take_string(blob)?;
    if curve != expected.as_bytes() {
        return Err(SshKeyError::Invalid(format!(
            "the ECDSA key names curve {:?}, expected {expected:?}",
            String::from_utf8_lossy(curve)
        )));
    }
    Ok(())
}

fn expect_point(blob: &mut &[u8], length: usize) -> Result<(), SshKeyError> {
    let point = take_string(blob)?;
    if point.len() != length || point.first() != Some(&0x04) {
        return Err(SshKeyError::Invalid(format!(
            "the ECDSA public point is {} bytes, expected an uncompressed point of {length}",
            point.len()
        )));
    }
    Ok(())
}

fn expect_ed25519(blob: &mut &[u8]) -> Result<(), SshKeyError> {
    let key = take_string(blob)?;
    if key.len() != 32 {
        return Err(SshKeyError::Invalid(format!(
            "an ed25519 key is 32 bytes, this one is {}",
            key.len()
        )));
    }
    Ok(())
}

/// Checks the fields after the embedded type name, by type.
fn check_key_fields(key_type: &str, blob: &mut &[u8]) -> Result<(), SshKeyError> {
    match key_type {
        "ssh-ed25519" => expect_ed25519(blob)?,
        "ecdsa-sha2-nistp256" => {
            expect_curve(blob, "nistp256")?;
            expect_point(blob, 65)?;
        }
        "ecdsa-sha2-nistp384" => {
            expect_curve(blob, "nistp384")?;
            expect_point(blob, 97)?;
        }
        "ecdsa-sha2-nistp521" => {
            expect_curve(blob, "nistp521")?;
            expect_point(blob, 133)?;
        }
        "ssh-rsa" => {
            let _exponent = take_string(blob)?;
            let modulus = take_string(blob)?;
            let significant = modulus.iter().skip_while(|byte| **byte == 0).count();
            let bits = significant * 8;
            if bits < MINIMUM_RSA_BITS {
                return Err(SshKeyError::Invalid(format!(
                    "the RSA key has {bits} bits, at least {MINIMUM_RSA_BITS} are required"
                )));
            }
        }
        "sk-ssh-ed25519@openssh.com" => {
            expect_ed25519(blob)?;
            let _application = take_string(blob)?;
        }
        "sk-ecdsa-sha2-nistp256@openssh.com" => {
            expect_curve(blob, "nistp256")?;
            expect_point(blob, 65)?;
            let _application = take_string(blob)?;
        }
        other => return Err(SshKeyError::UnknownType(other.to_owned())),
    }
    if !blob.is_empty() {
        return Err(SshKeyError::Malformed("extra bytes after the key"));
    }
    Ok(())
}

/// Parses and validates one public key as found in a `.pub` file: `type
/// base64 [comment]`, surrounding blank lines allowed.
pub fn parse_public_key(text: &str) -> Result<SshPublicKey, SshKeyError> {
    if text.contains("PRIVATE KEY") {
        return Err(SshKeyError::PrivateKey);
    }
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'));
    let line = lines.next().ok_or(SshKeyError::Empty)?;
    if lines.next().is_some() {
        return Err(SshKeyError::SeveralLines);
    }
    let mut fields = line.split_whitespace();
    let key_type = fields.next().ok_or(SshKeyError::Empty)?;
    if !ACCEPTED_KEY_TYPES.contains(&key_type) {
        return Err(SshKeyError::UnknownType(key_type.to_owned()));
    }
    let data = fields.next().ok_or(SshKeyError::MissingData)?;
    let comment = fields.collect::<Vec<_>>().join(" ");
    let blob = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|error| SshKeyError::Base64(error.to_string()))?;
    let mut rest = blob.as_slice();
    let embedded = take_string(&mut rest)?;
    if embedded != key_type.as_bytes() {
        return Err(SshKeyError::TypeMismatch {
            line: key_type.to_owned(),
            embedded: String::from_utf8_lossy(embedded).into_owned(),
        });
    }
    check_key_fields(key_type, &mut rest)?;
    Ok(SshPublicKey {
        key_type: key_type.to_owned(),
        data_base64: data.to_owned(),
        comment,
        blob,
    })
}

/// The `type base64` of the key in one `authorized_keys` line, skipping
/// leading options (`from="…",no-pty ssh-ed25519 AAAA… comment`); `None`
/// for blank lines, comments and lines holding no known key type.
pub fn key_in_authorized_keys_line(line: &str) -> Option<String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    fields.windows(2).find_map(|pair| {
        ACCEPTED_KEY_TYPES
            .contains(&pair[0])
            .then(|| format!("{} {}", pair[0], pair[1]))
    })
}

/// The fingerprint of a `type base64` text, if it parses as a valid key.
pub fn fingerprint_of_key_text(key_text: &str) -> Option<String> {
    parse_public_key(key_text).ok().map(|key| key.fingerprint())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn string(bytes: &[u8]) -> Vec<u8> {
        let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    }

    fn encode(parts: &[&[u8]]) -> String {
        let blob: Vec<u8> = parts.iter().flat_map(|part| string(part)).collect();
        base64::engine::general_purpose::STANDARD.encode(blob)
    }

    // Made with `ssh-keygen -t ed25519`; fingerprint from `ssh-keygen -lf`.
    const ED25519_LINE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKvkDk0qYpGPzoRl3X27cRHkeu9MS8y63dSFMpU6xIuH alice@laptop";
    const ED25519_FINGERPRINT: &str = "SHA256:pLGLmxHnsj8TXvxZ88dQsgFMHgkgkJ+FwTNJTirJ34A";

    #[test]
    fn a_real_ed25519_key_parses_with_its_ssh_keygen_fingerprint() {
        let key = parse_public_key(&format!("\n{ED25519_LINE}\n")).unwrap();
        assert_eq!(key.key_type, "ssh-ed25519");
        assert_eq!(key.comment, "alice@laptop");
        assert_eq!(key.fingerprint(), ED25519_FINGERPRINT);
        assert_eq!(key.openssh_line(), ED25519_LINE);
    }

    #[test]
    fn every_accepted_type_with_a_well_formed_blob_parses() {
        let point = |length: usize| {
            let mut point = vec![4u8];
            point.resize(length, 7);
            point
        };
        let mut modulus = vec![0u8];
        modulus.extend(std::iter::repeat_n(0xAB, 256));
        let cases: Vec<(&str, String)> = vec![
            ("ssh-ed25519", encode(&[b"ssh-ed25519", &[1; 32]])),
            (
                "ecdsa-sha2-nistp256",
                encode(&[b"ecdsa-sha2-nistp256", b"nistp256", &point(65)]),
            ),
            (
                "ecdsa-sha2-nistp384",
                encode(&[b"ecdsa-sha2-nistp384", b"nistp384", &point(97)]),
            ),
            (
                "ecdsa-sha2-nistp521",
                encode(&[b"ecdsa-sha2-nistp521", b"nistp521", &point(133)]),
            ),
            ("ssh-rsa", encode(&[b"ssh-rsa", &[1, 0, 1], &modulus])),
            (
                "sk-ssh-ed25519@openssh.com",
                encode(&[b"sk-ssh-ed25519@openssh.com", &[2; 32], b"ssh:"]),
            ),
            (
                "sk-ecdsa-sha2-nistp256@openssh.com",
                encode(&[
                    b"sk-ecdsa-sha2-nistp256@openssh.com",
                    b"nistp256",
                    &point(65),
                    b"ssh:",
                ]),
            ),
        ];
        for (key_type, data) in cases {
            let key = parse_public_key(&format!("{key_type} {data}"))
                .unwrap_or_else(|error| panic!("{key_type}: {error}"));
            assert_eq!(key.key_type, key_type);
            assert!(key.fingerprint().starts_with("SHA256:"));
        }
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        let ed25519_as_rsa = ED25519_LINE.replacen("ssh-ed25519", "ssh-rsa", 1);
        let short_rsa = format!(
            "ssh-rsa {}",
            encode(&[b"ssh-rsa", &[1, 0, 1], &[0xAB; 128]])
        );
        let long_ed25519 = format!("ssh-ed25519 {}", encode(&[b"ssh-ed25519", &[1; 33]]));
        let trailing = format!(
            "ssh-ed25519 {}",
            encode(&[b"ssh-ed25519", &[1; 32], b"extra"])
        );
        let wrong_curve = format!(
            "ecdsa-sha2-nistp256 {}",
            encode(&[b"ecdsa-sha2-nistp256", b"nistp384", &[4; 65]])
        );
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "empty"),
            ("   \n".into(), "empty"),
            ("hello world".into(), "not accepted"),
            ("ssh-dss AAAAB3NzaC1kc3MAAACBAP".into(), "not accepted"),
            ("ssh-ed25519".into(), "no key data"),
            ("ssh-ed25519 not!base64".into(), "not valid base64"),
            ("ssh-ed25519 AAAA".into(), "truncated"),
            (ed25519_as_rsa, "is a \"ssh-ed25519\" key"),
            (short_rsa, "1024 bits"),
            (long_ed25519, "32 bytes, this one is 33"),
            (trailing, "extra bytes"),
            (wrong_curve, "curve \"nistp384\""),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----"
                    .into(),
                "private key",
            ),
            (format!("{ED25519_LINE}\n{ED25519_LINE}"), "several lines"),
        ];
        for (text, expected) in cases {
            let error = parse_public_key(&text).expect_err(&text).to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn keys_are_found_in_authorized_keys_lines_after_options() {
        let data = "AAAAC3NzaC1lZDI1NTE5AAAAIKvkDk0qYpGPzoRl3X27cRHkeu9MS8y63dSFMpU6xIuH";
        let cases = [
            (format!("ssh-ed25519 {data} c"), true),
            (format!("no-pty,from=\"10.0.0.1\" ssh-ed25519 {data}"), true),
            ("# ssh-ed25519 commented".to_owned(), false),
            (String::new(), false),
            ("garbage line".to_owned(), false),
        ];
        for (line, found) in cases {
            let key = key_in_authorized_keys_line(&line);
            assert_eq!(key.is_some(), found, "{line}");
            if found {
                assert_eq!(key.unwrap(), format!("ssh-ed25519 {data}"));
            }
        }
        assert_eq!(
            fingerprint_of_key_text(&format!("ssh-ed25519 {data}")).as_deref(),
            Some(ED25519_FINGERPRINT)
        );
    }
}
