//! Join tokens: minted with a random id and secret (only the secret's hash is
//! stored), validated, listed and revoked. Spending a use is the store's one
//! conditional operation, done at enrollment.

use std::collections::BTreeMap;

use flotte_proto::identity::is_valid_segment;
use flotte_proto::join_token::JoinToken;
use flotte_proto::labels::validate_label;

use crate::join_tokens::mint_join_token;
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
            "zone {} {}",
            flotte_proto::names::quoted_prefix(&request.zone),
            flotte_proto::identity::SEGMENT_GRAMMAR
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

/// Validates, mints and stores a token; returns its record and its text.
pub async fn create_token(
    state: &ServerState,
    request: TokenRequest,
) -> Result<(JoinTokenRecord, JoinToken), TokenError> {
    validate_token_request(&request)?;
    let (record, token) = mint_join_token(
        state.clock.now_unix(),
        &state.ca.fingerprint(),
        &request.labels,
        &request.zone,
        request.ttl_seconds,
        request.uses,
    )
    .map_err(|_| TokenError::Random)?;
    state.store.insert_token(&record).await?;
    Ok((record, token))
}

pub async fn revoke_token(state: &ServerState, id: &str) -> Result<JoinTokenRecord, TokenError> {
    state
        .store
        .revoke_token(id, state.clock.now_unix())
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
