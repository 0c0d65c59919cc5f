//! The durable source of truth, behind the [`Store`] trait: machines, join
//! tokens, operators, the deny list, trusted release keys, the audit log, and
//! (as the product grows) everything else that must survive a restart.
//!
//! The trait speaks domain types and portable operations only (no SQLite-isms)
//! so that a PostgreSQL implementation can sit behind it for server replicas.
//! Hot paths never write here per message: heartbeats stay in the registry and
//! only transitions and batched last-seen times are persisted.
//!
//! Rules that must hold under concurrency are single conditional operations
//! with typed outcomes (a token use, the last admin, one quarantine, one
//! active rollout per machine), never a read followed by a write in the
//! caller. Errors are domain terms ([`StoreError`]); each backend maps its
//! driver's errors in its own module. Backends: `sqlite` (the embedded
//! default) and `postgres` (for replicas sharing one database), each with
//! the same numbered schema migrations applied at open. Every backend passes
//! the test-only `contract` suite.

mod access;
#[cfg(test)]
pub(crate) mod contract;
pub mod integrity;
mod postgres;
pub mod repair;
pub mod replicas;
mod rollouts;
pub mod settings;
mod sqlite;

use std::collections::BTreeMap;

pub use rollouts::{RolloutCreation, RolloutStore};

pub use access::{
    AccessSnapshot, AccessStore, FoundKeysRecord, GrantRecord, MachineAccessRecord,
    RefusedKeyRecord, UserKeyRecord, UserRecord, UserRevocation,
};
/// A directory removed when dropped, for tests that need files.
#[cfg(test)]
pub(crate) use sqlite::tests::TemporaryDirectory;
pub use sqlite::SqliteStore;
use uuid::Uuid;

use flotte_common::audit::{AuditEvent, AuditFilter, AuditRecord};
use flotte_common::audit_checkpoints::AuditCheckpoint;
use flotte_common::roles::Role;

/// Why a store operation failed, in terms every backend shares: each
/// backend maps its driver's errors into these inside its own module, so
/// that nothing above the store depends on a driver.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A concurrent writer won (serialization failure, lock held past the
    /// busy timeout): nothing was written, and the same call may succeed
    /// if made again.
    #[error("store conflict with a concurrent change (retry): {0}")]
    Conflict(String),
    /// The backend failed or cannot be reached (I/O, connection lost…).
    #[error("database error: {0}")]
    Backend(String),
    /// The database cannot be reached (refused, closed, timed out): nothing
    /// was written, and the same call works once it is back.
    #[error("the database cannot be reached: {0}")]
    Unavailable(String),
    /// The database's disk is full: nothing was written, and the same call
    /// works once space is freed.
    #[error("the database's disk is full: {0}")]
    DiskFull(String),
    #[error("store task failed: {0}")]
    Task(String),
    /// The store was migrated by a newer release: writing into a schema
    /// this binary does not know could lose or corrupt data.
    #[error(
        "the store's schema is version {found}, newer than version {supported}, the newest this \
         binary knows: run a release at least as new as the one that last opened this store"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    /// A leader-only write made under a lease that is no longer held: a
    /// newer leader may act, so this one must not.
    #[error("replica {holder} no longer leads (term {term} ended): its write was refused")]
    Fenced { holder: String, term: i64 },
}

impl StoreError {
    /// Whether making the same call again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }
}

/// Seconds since the Unix epoch: the store's only notion of time.
pub type UnixSeconds = i64;

/// A stored time as people read it in messages: RFC 3339, UTC, seconds.
/// (No stored time is before 1970; one would read as the epoch, since the
/// formatter cannot print earlier times.)
pub fn rfc3339(at: UnixSeconds) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(at.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(time).to_string()
}

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
    /// When it was first revoked (`None` if not, or revoked before the
    /// time was recorded).
    pub revoked_at: Option<UnixSeconds>,
    /// When it was last used to enroll a machine: its spent time once every
    /// allowed use is done.
    pub last_used_at: Option<UnixSeconds>,
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
    /// When the machine was decommissioned; a retired machine never comes back.
    pub retired_at: Option<UnixSeconds>,
    /// The image the machine must run, if one was set.
    pub desired_image: Option<DesiredImageRecord>,
}

/// An operator: a person or CI job holding an operator certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRecord {
    /// The name in `spiffe://<trust-domain>/operator/<name>`.
    pub name: String,
    pub role: Role,
    pub created_at: UnixSeconds,
    pub created_by: String,
    pub certificate_serial: String,
    pub certificate_not_after: UnixSeconds,
    /// When the operator was revoked; a revoked name is never reused.
    pub revoked_at: Option<UnixSeconds>,
}

/// The outcome of a change to an operator that must keep an admin: without
/// an active admin nobody could manage operators, tokens or revocation
/// short of a new `init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorChange {
    /// Done; the operator as it is now.
    Changed(OperatorRecord),
    NotFound,
    /// Refused, nothing written: the operator is the last active admin.
    LastAdmin(OperatorRecord),
}

/// What a deny-list entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeniedKind {
    /// One certificate, by its serial (lowercase hex).
    Serial,
    /// Every certificate of an identity URI.
    Identity,
}

impl DeniedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeniedKind::Serial => "serial",
            DeniedKind::Identity => "identity",
        }
    }
}

/// One entry of the persisted deny list, consulted at every handshake and RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedEntry {
    pub kind: DeniedKind,
    pub value: String,
    /// Shown to the refused peer and in logs, e.g. "machine … was decommissioned".
    pub reason: String,
    pub denied_at: UnixSeconds,
}

/// A trusted ed25519 release public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseKeyRecord {
    /// Lowercase hex SHA-256 of the raw key.
    pub id: String,
    pub name: String,
    /// The raw 32-byte key, standard base64.
    pub public_key_base64: String,
    pub added_at: UnixSeconds,
    pub added_by: String,
}

/// The image a machine is told to run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DesiredImageRecord {
    pub name: String,
    pub version: String,
    pub digest: String,
    /// Set when going back on purpose: the agent accepts a lower version.
    pub rollback: bool,
}

/// A pushed image: its signed manifest; the payload is a blob named by digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub size: u64,
    pub manifest_json: Vec<u8>,
    pub signature: Vec<u8>,
    pub signing_key: String,
    pub pushed_at: UnixSeconds,
    pub pushed_by: String,
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
    #[error("join token {id} expired at {}", rfc3339(*.expired_at))]
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
    /// Revokes a token, recording `now` the first time.
    async fn revoke_token(
        &self,
        id: &str,
        now: UnixSeconds,
    ) -> Result<Option<JoinTokenRecord>, StoreError>;
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
    /// The machines among `ids`, in one read (unknown ids are left out; no
    /// particular order): a rollout push names a wave of machines, read
    /// together rather than one round trip each.
    async fn machines_with_ids(&self, ids: &[Uuid]) -> Result<Vec<MachineRecord>, StoreError>;
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
    /// Records a pushed image; `false` if `name@version` already exists.
    async fn insert_image(&self, image: &ImageRecord) -> Result<bool, StoreError>;
    /// Images, newest push first; only `name` if given.
    async fn images(&self, name: Option<&str>) -> Result<Vec<ImageRecord>, StoreError>;
    async fn image(&self, name: &str, version: &str) -> Result<Option<ImageRecord>, StoreError>;
    /// Sets (or clears) a machine's desired image and bumps its desired-state
    /// version; `None` if no such machine.
    async fn set_desired_image(
        &self,
        id: Uuid,
        image: Option<&DesiredImageRecord>,
    ) -> Result<Option<MachineRecord>, StoreError>;
    /// Writes many last-seen times in one transaction.
    async fn record_last_seen(&self, seen: &[(Uuid, UnixSeconds)]) -> Result<(), StoreError>;
    /// Marks a machine retired and adds `denied` to the deny list, together;
    /// `None` if no such machine.
    async fn retire_machine(
        &self,
        id: Uuid,
        at: UnixSeconds,
        denied: &[DeniedEntry],
    ) -> Result<Option<MachineRecord>, StoreError>;

    /// `AlreadyExists` if the name was ever used (revoked names included).
    async fn insert_operator(&self, operator: &OperatorRecord) -> Result<(), StoreError>;
    async fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError>;
    async fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError>;
    /// Records an active operator's renewed certificate (serial and expiry)
    /// and returns the row as it is now; `None`, with nothing written, when
    /// the operator is unknown or revoked (checked in the same statement, so
    /// a revocation racing a renewal is never undone).
    async fn record_operator_certificate(
        &self,
        name: &str,
        serial_hex: &str,
        not_after: UnixSeconds,
    ) -> Result<Option<OperatorRecord>, StoreError>;
    /// Changes an operator's role, unless that would leave no active admin
    /// (checked and written in one transaction).
    async fn set_operator_role(&self, name: &str, role: Role)
        -> Result<OperatorChange, StoreError>;
    /// Marks an operator revoked and adds `denied` to the deny list, together,
    /// unless that would leave no active admin (checked in the same
    /// transaction). Revoking a revoked operator keeps the first stamp.
    async fn revoke_operator(
        &self,
        name: &str,
        at: UnixSeconds,
        denied: &[DeniedEntry],
    ) -> Result<OperatorChange, StoreError>;

    /// The whole deny list (loaded into memory at start).
    async fn denied_entries(&self) -> Result<Vec<DeniedEntry>, StoreError>;

    /// `AlreadyExists` if a key with the same id is trusted already.
    async fn insert_release_key(&self, key: &ReleaseKeyRecord) -> Result<(), StoreError>;
    /// `None` if no key has this id.
    async fn remove_release_key(&self, id: &str) -> Result<Option<ReleaseKeyRecord>, StoreError>;
    async fn release_keys(&self) -> Result<Vec<ReleaseKeyRecord>, StoreError>;

    /// Seals `event` as the next entry of the hash-chained audit log (reading
    /// the previous entry and appending in one atomic operation).
    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError>;
    /// Entries matching `filter`, in sequence order.
    async fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError>;
    /// The last entry's `seq` and hash; `None` for an empty log.
    async fn audit_head(&self) -> Result<Option<(u64, String)>, StoreError>;
    /// Records a signed checkpoint; one already recorded at the same entry
    /// is kept (two replicas may sign the same head).
    async fn insert_audit_checkpoint(&self, checkpoint: &AuditCheckpoint)
        -> Result<(), StoreError>;
    /// Checkpoints after entry `after_seq` and up to `up_to` (all if
    /// `None`), in sequence order.
    async fn audit_checkpoints(
        &self,
        after_seq: u64,
        up_to: Option<u64>,
    ) -> Result<Vec<AuditCheckpoint>, StoreError>;
    /// The checkpoint of the highest entry.
    async fn latest_audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>, StoreError>;

    /// How many writes this store has performed since start (the contract
    /// suite proves with it that last-seen batches are one write).
    #[cfg(test)]
    fn write_count(&self) -> u64;
}

/// The highest version the migrations' names carry (`V4__…` → 4): versions
/// need not be contiguous (a number may be taken by a branch not merged yet).
fn latest_migration_version(migrations: &[(&str, &str)]) -> i64 {
    migrations
        .iter()
        .filter_map(|(name, _)| name.strip_prefix('V')?.split("__").next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Logs each schema migration a backend applied at open.
fn log_applied_migrations(report: &refinery::Report) {
    for applied in report.applied_migrations() {
        tracing::info!(
            version = applied.version(),
            name = applied.name(),
            "schema migration applied"
        );
    }
}

/// Implements [`Store`] for a backend by calling, for each method, the
/// function of the same name in the backend's module for that aggregate
/// (`tokens`, `machines`, `images`, `operators`, `audit`), which every
/// backend lays out alike; expanded inside the backend's own module, whose
/// imports name the record types.
macro_rules! dispatch_store_to_aggregates {
    ($backend:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $backend {
            async fn insert_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError> {
                tokens::insert_token(self, token).await
            }

            async fn list_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
                tokens::list_tokens(self).await
            }

            async fn revoke_token(
                &self,
                id: &str,
                now: UnixSeconds,
            ) -> Result<Option<JoinTokenRecord>, StoreError> {
                tokens::revoke_token(self, id, now).await
            }

            async fn redeem_token(
                &self,
                secret_hash: &str,
                now: UnixSeconds,
            ) -> Result<TokenRedemption, StoreError> {
                tokens::redeem_token(self, secret_hash, now).await
            }

            async fn insert_machine(&self, machine: &MachineRecord) -> Result<(), StoreError> {
                machines::insert_machine(self, machine).await
            }

            async fn machine(&self, id: Uuid) -> Result<Option<MachineRecord>, StoreError> {
                machines::machine(self, id).await
            }

            async fn machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
                machines::machines(self).await
            }

            async fn machines_with_ids(
                &self,
                ids: &[Uuid],
            ) -> Result<Vec<MachineRecord>, StoreError> {
                machines::machines_with_ids(self, ids).await
            }

            async fn record_certificate(
                &self,
                id: Uuid,
                serial: &str,
                not_after: UnixSeconds,
            ) -> Result<(), StoreError> {
                machines::record_certificate(self, id, serial, not_after).await
            }

            async fn record_inventory(
                &self,
                id: Uuid,
                inventory: &Inventory,
                seen_at: UnixSeconds,
            ) -> Result<(), StoreError> {
                machines::record_inventory(self, id, inventory, seen_at).await
            }

            async fn update_labels(
                &self,
                id: Uuid,
                labels: &BTreeMap<String, String>,
            ) -> Result<Option<MachineRecord>, StoreError> {
                machines::update_labels(self, id, labels).await
            }

            async fn record_transition(
                &self,
                transition: &StateTransitionRecord,
            ) -> Result<(), StoreError> {
                machines::record_transition(self, transition).await
            }

            async fn transitions(
                &self,
                machine_id: Uuid,
                limit: u32,
            ) -> Result<Vec<StateTransitionRecord>, StoreError> {
                machines::transitions(self, machine_id, limit).await
            }

            async fn insert_image(&self, image: &ImageRecord) -> Result<bool, StoreError> {
                images::insert_image(self, image).await
            }

            async fn images(&self, name: Option<&str>) -> Result<Vec<ImageRecord>, StoreError> {
                images::images(self, name).await
            }

            async fn image(
                &self,
                name: &str,
                version: &str,
            ) -> Result<Option<ImageRecord>, StoreError> {
                images::image(self, name, version).await
            }

            async fn set_desired_image(
                &self,
                id: Uuid,
                image: Option<&DesiredImageRecord>,
            ) -> Result<Option<MachineRecord>, StoreError> {
                machines::set_desired_image(self, id, image).await
            }

            async fn record_last_seen(
                &self,
                seen: &[(Uuid, UnixSeconds)],
            ) -> Result<(), StoreError> {
                machines::record_last_seen(self, seen).await
            }

            async fn retire_machine(
                &self,
                id: Uuid,
                at: UnixSeconds,
                denied: &[DeniedEntry],
            ) -> Result<Option<MachineRecord>, StoreError> {
                machines::retire_machine(self, id, at, denied).await
            }

            async fn insert_operator(&self, operator: &OperatorRecord) -> Result<(), StoreError> {
                operators::insert_operator(self, operator).await
            }

            async fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError> {
                operators::operator(self, name).await
            }

            async fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
                operators::operators(self).await
            }

            async fn record_operator_certificate(
                &self,
                name: &str,
                serial_hex: &str,
                not_after: UnixSeconds,
            ) -> Result<Option<OperatorRecord>, StoreError> {
                operators::record_operator_certificate(self, name, serial_hex, not_after).await
            }

            async fn set_operator_role(
                &self,
                name: &str,
                role: Role,
            ) -> Result<OperatorChange, StoreError> {
                operators::set_operator_role(self, name, role).await
            }

            async fn revoke_operator(
                &self,
                name: &str,
                at: UnixSeconds,
                denied: &[DeniedEntry],
            ) -> Result<OperatorChange, StoreError> {
                operators::revoke_operator(self, name, at, denied).await
            }

            async fn denied_entries(&self) -> Result<Vec<DeniedEntry>, StoreError> {
                operators::denied_entries(self).await
            }

            async fn insert_release_key(&self, key: &ReleaseKeyRecord) -> Result<(), StoreError> {
                images::insert_release_key(self, key).await
            }

            async fn remove_release_key(
                &self,
                id: &str,
            ) -> Result<Option<ReleaseKeyRecord>, StoreError> {
                images::remove_release_key(self, id).await
            }

            async fn release_keys(&self) -> Result<Vec<ReleaseKeyRecord>, StoreError> {
                images::release_keys(self).await
            }

            async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
                audit::append_audit(self, event).await
            }

            async fn audit_entries(
                &self,
                filter: &AuditFilter,
            ) -> Result<Vec<AuditRecord>, StoreError> {
                audit::audit_entries(self, filter).await
            }

            async fn audit_head(&self) -> Result<Option<(u64, String)>, StoreError> {
                audit::audit_head(self).await
            }

            async fn insert_audit_checkpoint(
                &self,
                checkpoint: &flotte_common::audit_checkpoints::AuditCheckpoint,
            ) -> Result<(), StoreError> {
                audit::insert_audit_checkpoint(self, checkpoint).await
            }

            async fn audit_checkpoints(
                &self,
                after_seq: u64,
                up_to: Option<u64>,
            ) -> Result<Vec<flotte_common::audit_checkpoints::AuditCheckpoint>, StoreError> {
                audit::audit_checkpoints(self, after_seq, up_to).await
            }

            async fn latest_audit_checkpoint(
                &self,
            ) -> Result<Option<flotte_common::audit_checkpoints::AuditCheckpoint>, StoreError> {
                audit::latest_audit_checkpoint(self).await
            }

            #[cfg(test)]
            fn write_count(&self) -> u64 {
                self.metrics.writes.get()
            }
        }
    };
}
pub(crate) use dispatch_store_to_aggregates;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_times_read_as_rfc3339_in_messages() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_083_200), "2026-12-01T00:00:00Z");
        assert_eq!(rfc3339(-86_400), "1970-01-01T00:00:00Z");
        let refusal = TokenRefusal::Expired {
            id: "t1".into(),
            expired_at: 1_796_083_200,
        };
        assert_eq!(
            refusal.to_string(),
            "join token t1 expired at 2026-12-01T00:00:00Z"
        );
    }

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
            revoked_at: None,
            last_used_at: None,
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
