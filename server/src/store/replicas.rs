//! What several server replicas share about themselves: each replica's
//! lease (a heartbeat row), which replica holds each agent session, the
//! leader-only loops' lease with its fencing term, and the change feed that
//! wakes every replica after a write.
//!
//! Lease times are measured by the store's own clock (PostgreSQL's
//! `clock_timestamp()`; the process clock for the single-process SQLite
//! store), so replicas whose clocks disagree still agree on who leads.
//! Nothing here decides anything: `live::replicas` and `live::leadership`
//! do, from what these operations return.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::broadcast;
use uuid::Uuid;

use super::{StoreError, UnixSeconds};

/// A replica as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRegistration {
    pub name: String,
    pub zone: String,
    /// The address agents and operators reach it on (`host:port`).
    pub address: String,
    pub started_at: UnixSeconds,
}

/// A replica as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub registration: ReplicaRegistration,
    /// Milliseconds since it last renewed its lease.
    pub lease_age_ms: i64,
    /// Whether its lease is still running.
    pub live: bool,
    pub leader: bool,
    /// Agent sessions it holds.
    pub sessions: u64,
}

/// Proof of leadership: the holder and the term it was granted. Every
/// write of a leader-only loop carries it; the store refuses the write
/// (with [`StoreError::Fenced`]) once another term began or the lease
/// lapsed, so a paused or cut-off former leader cannot act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub holder: String,
    pub term: i64,
}

/// What a replica's subscription to the change feed yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// A change announced by some replica (maybe this one).
    Message(String),
    /// Messages may have been lost (the connection to the database was
    /// lost, or this subscriber lagged): reload everything cached.
    Resynchronise,
}

/// Feed messages a subscriber may fall behind by before it is told to
/// resynchronise.
pub const FEED_BUFFER: usize = 4096;

/// Most bytes one feed message may have (PostgreSQL's NOTIFY payload is
/// limited to 8000 bytes; callers split bigger changes).
pub const FEED_MESSAGE_MAX_BYTES: usize = 7900;

#[async_trait::async_trait]
pub trait ReplicaStore: Send + Sync + 'static {
    /// Records `replica` as alive for `lease` more (inserts it the first time).
    async fn renew_replica(
        &self,
        replica: &ReplicaRegistration,
        lease: Duration,
    ) -> Result<(), StoreError>;
    /// Removes `replica` and the sessions it held (a clean stop).
    async fn remove_replica(&self, name: &str) -> Result<(), StoreError>;
    /// Every replica known, by name.
    async fn replicas(&self) -> Result<Vec<ReplicaStatus>, StoreError>;
    /// Records that `replica` holds the session of `machine` now (taking
    /// it over from any other replica).
    async fn claim_session(
        &self,
        machine: Uuid,
        replica: &str,
        since: UnixSeconds,
    ) -> Result<(), StoreError>;
    /// Forgets the session of `machine` if `replica` still holds it (a newer
    /// session on another replica is left alone).
    async fn release_session(&self, machine: Uuid, replica: &str) -> Result<(), StoreError>;
    /// Forgets every session `replica` held (at its start: they ended with
    /// its previous run).
    async fn release_sessions_of(&self, replica: &str) -> Result<(), StoreError>;
    /// The replica holding each session, for sessions held by a replica
    /// whose lease is running.
    async fn live_session_holders(&self) -> Result<HashMap<Uuid, String>, StoreError>;
    /// Takes or renews the leader-only loops' lease for `replica`: a new
    /// term if the lease was free or lapsed, the same term if `replica`
    /// already held it, `None` if another replica holds a running lease.
    async fn try_lead(&self, replica: &str, lease: Duration) -> Result<Option<Fence>, StoreError>;
    /// Gives the lease up at once (a clean stop), if `fence` still holds it.
    async fn step_down(&self, fence: &Fence) -> Result<(), StoreError>;
    /// Sends `message` to every replica's subscription (this one's too).
    /// At most [`FEED_MESSAGE_MAX_BYTES`].
    async fn announce(&self, message: &str) -> Result<(), StoreError>;
    /// A subscription to the change feed.
    fn subscribe(&self) -> broadcast::Receiver<FeedEvent>;
}
