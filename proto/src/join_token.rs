//! Join tokens: `flotte1.<id>.<secret>.<ca-sha256>`.
//!
//! The token is the only secret an agent needs to enroll. It carries the
//! SHA-256 fingerprint of the server's CA certificate so that the agent can pin
//! the CA on first contact (trust on first use is never needed). The server
//! stores only a hash of the secret; the id is public and names the token in
//! `token list` / `token revoke`.

use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "flotte1";

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    /// Lowercase hex SHA-256 of the CA certificate (DER).
    pub ca_fingerprint: String,
}

// The secret must never reach a log line through `{:?}`.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinTokenError {
    #[error("join token is malformed: expected flotte1.<id>.<secret>.<ca-fingerprint>")]
    Malformed,
    #[error("join token's CA fingerprint is not 64 hex digits")]
    BadFingerprint,
}

fn is_lower_hex(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl FromStr for JoinToken {
    type Err = JoinTokenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.trim().split('.');
        let (Some(PREFIX), Some(id), Some(secret), Some(fingerprint), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(JoinTokenError::Malformed);
        };
        if !is_lower_hex(id) || !is_lower_hex(secret) {
            return Err(JoinTokenError::Malformed);
        }
        if fingerprint.len() != 64 || !is_lower_hex(fingerprint) {
            return Err(JoinTokenError::BadFingerprint);
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_fingerprint: fingerprint.to_owned(),
        })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}",
            self.id, self.secret, self.ca_fingerprint
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_redacts_secret() {
        let token = JoinToken {
            id: "0a1b".into(),
            secret: "deadbeef".into(),
            ca_fingerprint: "a".repeat(64),
        };
        let parsed: JoinToken = token.to_string().parse().unwrap();
        assert_eq!(parsed, token);
        assert!(!format!("{token:?}").contains("deadbeef"));
    }

    #[test]
    fn refuses_malformed_tokens() {
        let fingerprint = "b".repeat(64);
        assert_eq!("".parse::<JoinToken>(), Err(JoinTokenError::Malformed));
        assert_eq!(
            format!("flotte2.aa.bb.{fingerprint}").parse::<JoinToken>(),
            Err(JoinTokenError::Malformed)
        );
        assert_eq!(
            format!("flotte1.aa.zz.{fingerprint}").parse::<JoinToken>(),
            Err(JoinTokenError::Malformed)
        );
        assert_eq!(
            "flotte1.aa.bb.abc".parse::<JoinToken>(),
            Err(JoinTokenError::BadFingerprint)
        );
        assert_eq!(
            format!("flotte1.aa.bb.{fingerprint}.x").parse::<JoinToken>(),
            Err(JoinTokenError::Malformed)
        );
    }
}
