//! The durable source of truth, behind the [`Store`] trait: machines, join
//! tokens, and (as the product grows) everything else that must survive a
//! restart.
//!
//! The trait speaks domain types and portable operations only (no SQLite-isms)
//! so that a PostgreSQL implementation can sit behind it for server replicas.
//! Hot paths never write here per message: heartbeats stay in the registry and
//! only transitions and batched last-seen times are persisted.

mod sqlite;

use std::collections::BTreeMap;

pub use sqlite::SqliteStore;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store task failed: {0}")]
    Task(String),
}

/// Seconds since the Unix epoch: the store's only notion of time.
pub type UnixSeconds = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    pub id: String,
    /// Lowercase hex SHA-256 of the secret part of the token.
    pub secret_hash: String,
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    pub created_at: UnixSeconds,
    pub expires_at: UnixSeconds,
    pub uses_allowed: u32,
    pub uses_done: u32,
    pub revoked: bool,
}

/// What the server learns from an agent's hello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub arch: String,
    pub agent_version: String,
    pub boot_time: UnixSeconds,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRecord {
    pub id: Uuid,
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    pub enrolled_at: UnixSeconds,
    pub enrolled_with_token: String,
    pub certificate_serial: String,
    /// The serial before the last renewal: if the renewal's answer was lost
    /// (server killed after recording it), the agent still holds this one.
    pub previous_certificate_serial: String,
    pub certificate_not_after: UnixSeconds,
    pub inventory: Inventory,
    /// Last time the machine was heard from, as of the last batched flush.
    pub last_seen: UnixSeconds,
    /// Bumped whenever anything the agent must apply changes.
    pub desired_version: u64,
    /// Health state name (see `health::MachineState`), why, and since when.
    pub state: String,
    pub state_reason: String,
    pub state_since: UnixSeconds,
}

/// One stored change of a machine's health state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateTransitionRecord {
    pub machine_id: Uuid,
    pub at: UnixSeconds,
    pub from: String,
    pub to: String,
    pub reason: String,
}

/// The outcome of trying to spend one use of a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRedemption {
    Redeemed(JoinTokenRecord),
    Refused(TokenRefusal),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("join token is unknown to this server")]
    Unknown,
    #[error("join token {id} was revoked")]
    Revoked { id: String },
    #[error("join token {id} expired at {expired_at} (unix seconds)")]
    Expired { id: String, expired_at: UnixSeconds },
    #[error("join token {id} has already been used ({uses_done} of {uses_allowed} uses)")]
    UsedUp {
        id: String,
        uses_done: u32,
        uses_allowed: u32,
    },
}

/// Why a token that matched no conditional update was refused: a pure
/// function so that every store implementation classifies alike.
pub fn classify_token_refusal(record: Option<&JoinTokenRecord>, now: UnixSeconds) -> TokenRefusal {
    match record {
        None => TokenRefusal::Unknown,
        Some(token) if token.revoked => TokenRefusal::Revoked {
            id: token.id.clone(),
        },
        Some(token) if token.expires_at <= now => TokenRefusal::Expired {
            id: token.id.clone(),
            expired_at: token.expires_at,
        },
        Some(token) => TokenRefusal::UsedUp {
            id: token.id.clone(),
            uses_done: token.uses_done,
            uses_allowed: token.uses_allowed,
        },
    }
}

/// The durable store. Every method is one atomic operation.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn insert_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError>;
    async fn list_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError>;
    /// Marks a token revoked; `None` if no token has this id.
    async fn revoke_token(&self, id: &str) -> Result<Option<JoinTokenRecord>, StoreError>;
    /// Atomically spends one use of the token whose secret hashes to
    /// `secret_hash`, if it is unrevoked, unexpired at `now` and not used up.
    async fn redeem_token(
        &self,
        secret_hash: &str,
        now: UnixSeconds,
    ) -> Result<TokenRedemption, StoreError>;

    async fn insert_machine(&self, machine: &MachineRecord) -> Result<(), StoreError>;
    async fn machine(&self, id: Uuid) -> Result<Option<MachineRecord>, StoreError>;
    async fn machines(&self) -> Result<Vec<MachineRecord>, StoreError>;
    /// Records a newly issued certificate; the current serial becomes the previous one.
    async fn record_certificate(
        &self,
        id: Uuid,
        serial: &str,
        not_after: UnixSeconds,
    ) -> Result<(), StoreError>;
    async fn record_inventory(
        &self,
        id: Uuid,
        inventory: &Inventory,
        seen_at: UnixSeconds,
    ) -> Result<(), StoreError>;
    /// Replaces a machine's labels and bumps its desired-state version;
    /// `None` if no such machine.
    async fn update_labels(
        &self,
        id: Uuid,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<MachineRecord>, StoreError>;
    /// Appends a state transition and makes it the machine's current state,
    /// atomically.
    async fn record_transition(&self, transition: &StateTransitionRecord)
        -> Result<(), StoreError>;
    /// The latest `limit` transitions of a machine, newest first.
    async fn transitions(
        &self,
        machine_id: Uuid,
        limit: u32,
    ) -> Result<Vec<StateTransitionRecord>, StoreError>;
    /// Writes many last-seen times in one transaction.
    async fn record_last_seen(&self, seen: &[(Uuid, UnixSeconds)]) -> Result<(), StoreError>;

    /// How many writes this store has performed since start (for `/metrics`
    /// and for proving that reports cause no per-report writes).
    fn write_count(&self) -> u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(revoked: bool, expires_at: i64, uses_done: u32) -> JoinTokenRecord {
        JoinTokenRecord {
            id: "t1".into(),
            secret_hash: "h".into(),
            labels: BTreeMap::new(),
            zone: "dc1".into(),
            created_at: 0,
            expires_at,
            uses_allowed: 1,
            uses_done,
            revoked,
        }
    }

    #[test]
    fn refusals_name_the_first_reason_that_applies() {
        let now = 100;
        assert_eq!(classify_token_refusal(None, now), TokenRefusal::Unknown);
        assert!(matches!(
            classify_token_refusal(Some(&token(true, 50, 1)), now),
            TokenRefusal::Revoked { .. }
        ));
        assert!(matches!(
            classify_token_refusal(Some(&token(false, 50, 0)), now),
            TokenRefusal::Expired { expired_at: 50, .. }
        ));
        assert!(matches!(
            classify_token_refusal(Some(&token(false, 500, 1)), now),
            TokenRefusal::UsedUp {
                uses_done: 1,
                uses_allowed: 1,
                ..
            }
        ));
    }
}
