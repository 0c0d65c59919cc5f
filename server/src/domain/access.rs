//! Access for people, server side: compiling the SSH access policy of one
//! machine from users, keys and grants (pure, in `policy`), and the
//! in-memory hub (`hub`) that caches the compiled inputs and tracks which
//! policy version each machine applied.
//!
//! Nothing here knows about gRPC: `api::access` converts to the wire and
//! fans changes out to sessions. Nothing here may write to the store per
//! agent message: acknowledgements are batched by the hub's flusher.

pub use crate::domain::access_policy::{
    access_report, compile_policy, delivery_status, DeliveryStatus, MachinePolicy, ReportRow,
};

/// What can go wrong validating access requests (turned into statuses by the API).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("login {0:?} is not a valid Unix login (lowercase letters, digits, '_', '-', '.', starting with a letter or '_', at most 32 characters)")]
    InvalidLogin(String),
    #[error("user name {} {}", flotte_proto::names::quoted_prefix(.0), flotte_proto::identity::SEGMENT_GRAMMAR)]
    InvalidUserName(String),
    #[error("selector {selector:?}: {reason}")]
    InvalidSelector { selector: String, reason: String },
    #[error("expiry {text:?} is not an RFC 3339 UTC time such as 2027-01-31T00:00:00Z: {reason}")]
    InvalidExpiry { text: String, reason: String },
    #[error("expiry {text} is already in the past")]
    ExpiryInPast { text: String },
}

/// A Unix login as sshd passes it in `%u`: never a path.
pub fn validate_login(login: &str) -> Result<(), AccessError> {
    let mut characters = login.chars();
    let valid_first = characters
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first == '_');
    let valid_rest = characters.all(|character| {
        character.is_ascii_lowercase()
            || character.is_ascii_digit()
            || matches!(character, '_' | '-' | '.')
    });
    if valid_first && valid_rest && login.len() <= 32 {
        Ok(())
    } else {
        Err(AccessError::InvalidLogin(login.to_owned()))
    }
}

pub fn validate_user_name(name: &str) -> Result<(), AccessError> {
    if flotte_proto::identity::is_valid_segment(name) {
        Ok(())
    } else {
        Err(AccessError::InvalidUserName(name.to_owned()))
    }
}

/// Parses an optional RFC 3339 expiry; empty means never. An expiry in the
/// past is refused (a grant that never works is a mistake).
pub fn parse_expiry(text: &str, now: i64) -> Result<Option<i64>, AccessError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let time = humantime::parse_rfc3339_weak(text).map_err(|error| AccessError::InvalidExpiry {
        text: text.to_owned(),
        reason: error.to_string(),
    })?;
    let seconds = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |duration| {
            i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
        });
    if seconds <= now {
        return Err(AccessError::ExpiryInPast {
            text: text.to_owned(),
        });
    }
    Ok(Some(seconds))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn logins_are_unix_names_never_paths() {
        for login in ["alice", "_svc", "deploy-1", "a.b", "x"] {
            assert!(validate_login(login).is_ok(), "{login}");
        }
        for login in ["", "Alice", "../etc", "a/b", "1abc", "a b", &"a".repeat(33)] {
            assert!(validate_login(login).is_err(), "{login:?}");
        }
    }

    #[test]
    fn expiries_parse_as_rfc3339_and_the_past_is_refused() {
        assert_eq!(parse_expiry("", 0).unwrap(), None);
        assert_eq!(
            parse_expiry("2027-01-31T00:00:00Z", 0).unwrap(),
            Some(1_801_353_600)
        );
        assert!(matches!(
            parse_expiry("2027-01-31T00:00:00Z", 1_801_353_600),
            Err(AccessError::ExpiryInPast { .. })
        ));
        assert!(matches!(
            parse_expiry("next tuesday", 0),
            Err(AccessError::InvalidExpiry { .. })
        ));
    }
}
