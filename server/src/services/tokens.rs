//! Join tokens: minted with a random id and secret (only the secret's hash is
//! stored), validated, listed and revoked. Spending a use is the store's one
//! conditional operation, done at enrollment.

use std::collections::BTreeMap;

use flotte_proto::identity::is_valid_segment;
use flotte_proto::join_token::JoinToken;
use flotte_proto::labels::validate_label;
use ring::rand::{SecureRandom, SystemRandom};

use crate::services::enrollment::hash_secret;
use crate::store::{JoinTokenRecord, StoreError};
use crate::ServerState;

/// Longest join token lifetime: a token is a secret in transit, not a credential to keep.
const MAX_TOKEN_TTL_SECONDS: u64 = 30 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Every problem of the request, together.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("no join token with id {0}")]
    NotFound(String),
    #[error("the system random number generator failed")]
    Random,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    pub ttl_seconds: u64,
    pub uses: u32,
}

fn random_hex(bytes: usize) -> Result<String, TokenError> {
    let mut buffer = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buffer)
        .map_err(|_| TokenError::Random)?;
    Ok(hex::encode(buffer))
}

/// Checks a token request, listing every problem together.
pub fn validate_token_request(request: &TokenRequest) -> Result<(), TokenError> {
    let mut problems = Vec::new();
    for (key, value) in &request.labels {
        if let Err(error) = validate_label(key, value) {
            problems.push(error.to_string());
        }
    }
    if !is_valid_segment(&request.zone) {
        problems.push(format!(
            "zone {:?} must be non-empty letters, digits, '.', '_' or '-'",
            request.zone
        ));
    }
    if request.ttl_seconds == 0 {
        problems.push("ttl must be positive".to_owned());
    } else if request.ttl_seconds > MAX_TOKEN_TTL_SECONDS {
        problems.push(format!(
            "ttl of {} s is longer than the maximum of 30 days",
            request.ttl_seconds
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TokenError::Invalid(problems))
    }
}

/// A new join token (not stored yet): its record, with only the secret's
/// hash, and the token text to hand out. Used by operators' requests and by
/// remediation (a replacement machine enrolls with one).
pub fn new_join_token(
    state: &ServerState,
    request: TokenRequest,
) -> Result<(JoinTokenRecord, JoinToken), TokenError> {
    let now = state.clock.now_unix();
    let secret = random_hex(16)?;
    let record = JoinTokenRecord {
        id: random_hex(6)?,
        secret_hash: hash_secret(&secret),
        labels: request.labels,
        zone: request.zone,
        created_at: now,
        expires_at: now.saturating_add(i64::try_from(request.ttl_seconds).unwrap_or(i64::MAX)),
        uses_allowed: request.uses.max(1),
        uses_done: 0,
        revoked: false,
    };
    let token = JoinToken {
        id: record.id.clone(),
        secret,
        ca_fingerprint: state.ca.fingerprint(),
    };
    Ok((record, token))
}

/// Validates, mints and stores a token; returns its record and its text.
pub async fn create_token(
    state: &ServerState,
    request: TokenRequest,
) -> Result<(JoinTokenRecord, JoinToken), TokenError> {
    validate_token_request(&request)?;
    let (record, token) = new_join_token(state, request)?;
    state.store.insert_token(&record).await?;
    Ok((record, token))
}

pub async fn revoke_token(state: &ServerState, id: &str) -> Result<JoinTokenRecord, TokenError> {
    state
        .store
        .revoke_token(id)
        .await?
        .ok_or_else(|| TokenError::NotFound(id.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn token_requests_list_every_problem() {
        let request = TokenRequest {
            labels: [("bad key".to_owned(), "v".to_owned())].into(),
            zone: String::new(),
            ttl_seconds: 0,
            uses: 1,
        };
        let message = validate_token_request(&request).unwrap_err().to_string();
        assert!(message.contains("bad key"), "{message}");
        assert!(message.contains("zone"), "{message}");
        assert!(message.contains("ttl must be positive"), "{message}");
    }
}
