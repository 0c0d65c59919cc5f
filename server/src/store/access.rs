//! Access for people, as stored: users, their SSH keys, grants (user →
//! login on machines matching a selector, until an expiry), the global
//! access-policy version, and per machine the version it applied and the
//! keys it found. Behind [`AccessStore`], kept apart from [`super::Store`]
//! so that this topic grows without touching the core trait.
//!
//! Every mutation bumps the policy version in the same transaction, so a
//! version names exactly one state of users, keys and grants.

use uuid::Uuid;

use super::{StoreError, UnixSeconds};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub created_at: UnixSeconds,
    pub created_by: String,
    /// When the user was off-boarded; a revoked user has no keys or grants.
    pub revoked_at: Option<UnixSeconds>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserKeyRecord {
    pub user: String,
    /// `SHA256:…` of the key blob; unique per user.
    pub fingerprint: String,
    pub key_type: String,
    /// `type base64`, without comment.
    pub public_key: String,
    pub comment: String,
    pub added_at: UnixSeconds,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    pub id: String,
    pub user: String,
    /// Selector text (`role=web,env=prod`), validated before it is stored.
    pub selector: String,
    pub login: String,
    pub expires_at: Option<UnixSeconds>,
    pub created_at: UnixSeconds,
    pub created_by: String,
}

/// Everything the access policy of any machine is compiled from, read in one
/// transaction so that it matches `version` exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessSnapshot {
    pub version: u64,
    pub users: Vec<UserRecord>,
    pub keys: Vec<UserKeyRecord>,
    pub grants: Vec<GrantRecord>,
}

/// Keys an agent found for one managed login in one file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FoundKeysRecord {
    pub login: String,
    pub source: String,
    /// `type base64` of each key.
    pub public_keys: Vec<String>,
    /// The file was not read, and why (its keys are then unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_read_reason: Option<String>,
}

/// A key (or login) of the policy an agent refused to install, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefusedKeyRecord {
    pub login: String,
    pub user: String,
    pub grant_id: String,
    /// The key's fingerprint, or a short quoted prefix of its text.
    pub key: String,
    pub reason: String,
}

/// What one machine last told us about access.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineAccessRecord {
    pub machine_id: Uuid,
    pub applied_version: u64,
    pub applied_at: UnixSeconds,
    pub missing_logins: Vec<String>,
    pub found: Vec<FoundKeysRecord>,
    /// What the agent's own boundary refused to install.
    pub refused: Vec<RefusedKeyRecord>,
}

/// What an off-boarding removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRevocation {
    pub user: UserRecord,
    pub grants_removed: u32,
    pub keys_removed: u32,
    pub version: u64,
}

/// The durable store of access. Every method is one atomic operation; each
/// mutation returns the new policy version.
#[async_trait::async_trait]
pub trait AccessStore: Send + Sync + 'static {
    /// `AlreadyExists` if the name was ever used.
    async fn insert_user(
        &self,
        user: &UserRecord,
        keys: &[UserKeyRecord],
    ) -> Result<u64, StoreError>;
    /// `AlreadyExists` if the user has this key already.
    async fn insert_user_key(&self, key: &UserKeyRecord) -> Result<u64, StoreError>;
    /// `None` if the user has no key with this fingerprint.
    async fn remove_user_key(
        &self,
        user: &str,
        fingerprint: &str,
    ) -> Result<Option<(UserKeyRecord, u64)>, StoreError>;
    async fn insert_grant(&self, grant: &GrantRecord) -> Result<u64, StoreError>;
    /// `None` if no grant has this id.
    async fn remove_grant(&self, id: &str) -> Result<Option<(GrantRecord, u64)>, StoreError>;
    /// Removes every grant and key of `name` and marks it revoked, together;
    /// `None` if no such user.
    async fn revoke_user(
        &self,
        name: &str,
        at: UnixSeconds,
    ) -> Result<Option<UserRevocation>, StoreError>;
    async fn access_snapshot(&self) -> Result<AccessSnapshot, StoreError>;
    /// Upserts many machines' access records in one transaction.
    async fn record_machine_access(
        &self,
        records: &[MachineAccessRecord],
    ) -> Result<(), StoreError>;
    async fn machine_access(&self) -> Result<Vec<MachineAccessRecord>, StoreError>;
}
