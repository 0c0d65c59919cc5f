//! People's access: users, their keys and grants. Every committed change is
//! handed to the publisher, which recompiles and pushes each connected
//! machine's policy before the call answers. Off-boarding removes a user's
//! grants and keys and revokes the operator of the same name, in one call.

use crate::services::operators;
use crate::store::{StoreError, UserRevocation};
use crate::ServerState;

#[derive(Debug, thiserror::Error)]
pub enum AccessServiceError {
    #[error("no user named {0}")]
    NoSuchUser(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What off-boarding did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offboarded {
    pub revocation: UserRevocation,
    /// The policy version that carries the removal.
    pub policy_version: u64,
    /// What happened to the operator of the same name, in words.
    pub operator: String,
}

/// Off-boards `name`: every grant and key removed and pushed first (that is
/// what must reach every machine within a second), then the operator of the
/// same name revoked, if there is one.
pub async fn offboard_user(
    state: &ServerState,
    name: &str,
    revoked_by: &str,
) -> Result<Offboarded, AccessServiceError> {
    let now = state.clock.now_unix();
    let revocation = state
        .access
        .store()
        .revoke_user(name, now)
        .await?
        .ok_or_else(|| AccessServiceError::NoSuchUser(name.to_owned()))?;
    let policy_version = state.publisher.access_changed().await?;
    let operator = match state.store.operator(name).await? {
        None => "none".to_owned(),
        Some(operator) if operator.revoked_at.is_some() => "already revoked".to_owned(),
        Some(_) => match operators::revoke(state, name, revoked_by).await {
            Ok(_) => "revoked".to_owned(),
            Err(error) => format!("not revoked: {error}"),
        },
    };
    tracing::warn!(user = name, %revoked_by, grants = revocation.grants_removed, keys = revocation.keys_removed, %operator, policy_version, "user off-boarded");
    Ok(Offboarded {
        revocation,
        policy_version,
        operator,
    })
}
