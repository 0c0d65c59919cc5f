//! The live registry: one entry per connected agent session, in memory only.
//!
//! Reports update an entry here and nothing else; the store sees only
//! connects, disconnects and batched last-seen flushes. The lock is a plain
//! mutex held for a map operation and never across an `.await`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::access_policy::MachinePolicy;
use crate::domain::desired_state::DesiredState;
use crate::store::UnixSeconds;

/// Messages queued to one agent; bounded so a stuck agent cannot grow memory.
pub const SESSION_QUEUE_DEPTH: usize = 16;

/// What the server says to one agent on its session, in domain terms (the
/// session edge turns each into its wire form as it is sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionMessage {
    DesiredState(Box<DesiredState>),
    /// A new access policy alone (a fan-out after an access change).
    AccessPolicy(MachinePolicy),
    CertificateIssued {
        certificate_pem: String,
        not_after: UnixSeconds,
    },
    /// The machine may not have a session (decommissioned): said once, then
    /// the session ends.
    Refused(String),
    /// The server ends this session (replaced by a newer one, or shutdown);
    /// the stream closes with this reason.
    Ended(String),
    /// Verify the running image now (`restore`: re-create it first); the
    /// answer carries `request_id`.
    ImageCommand {
        request_id: String,
        restore: bool,
    },
}

pub type SessionSender = mpsc::Sender<SessionMessage>;

#[derive(Debug, Clone)]
pub struct SessionEntry {
    pub session_id: u64,
    pub sender: SessionSender,
    /// Cancelled to end this session (replaced by a newer one, or shutdown).
    pub cancel: CancellationToken,
    pub remote_address: SocketAddr,
    pub connected_at: UnixSeconds,
    pub last_seen: UnixSeconds,
    pub applied_desired_version: u64,
}

/// A read-only view of a connected machine for API and controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedView {
    pub remote_address: SocketAddr,
    pub connected_at: UnixSeconds,
    pub last_seen: UnixSeconds,
    pub applied_desired_version: u64,
}

#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<Uuid, SessionEntry>>,
    next_session_id: AtomicU64,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, SessionEntry>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every operation is a single insert/remove/field write), so a
        // poisoned lock is still consistent.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn allocate_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a session; an older session of the same machine is cancelled
    /// (the agent reconnected before the old stream noticed it was dead).
    pub fn register(&self, machine: Uuid, entry: SessionEntry) {
        if let Some(previous) = self.lock().insert(machine, entry) {
            previous.cancel.cancel();
        }
    }

    /// Removes the session only if it is still the current one for `machine`.
    pub fn unregister(&self, machine: Uuid, session_id: u64) -> Option<SessionEntry> {
        let mut sessions = self.lock();
        if sessions.get(&machine).map(|entry| entry.session_id) == Some(session_id) {
            sessions.remove(&machine)
        } else {
            None
        }
    }

    pub fn touch(&self, machine: Uuid, now: UnixSeconds) {
        if let Some(entry) = self.lock().get_mut(&machine) {
            entry.last_seen = now;
        }
    }

    pub fn record_applied_version(&self, machine: Uuid, version: u64) {
        if let Some(entry) = self.lock().get_mut(&machine) {
            entry.applied_desired_version = version;
        }
    }

    pub fn view(&self, machine: Uuid) -> Option<ConnectedView> {
        self.lock().get(&machine).map(view_of)
    }

    pub fn views(&self) -> HashMap<Uuid, ConnectedView> {
        self.lock()
            .iter()
            .map(|(id, entry)| (*id, view_of(entry)))
            .collect()
    }

    pub fn sender(&self, machine: Uuid) -> Option<SessionSender> {
        self.lock().get(&machine).map(|entry| entry.sender.clone())
    }

    pub fn connected_count(&self) -> usize {
        self.lock().len()
    }

    /// Ends a machine's current session (the agent will reconnect).
    pub fn end_session(&self, machine: Uuid) {
        if let Some(entry) = self.lock().get(&machine) {
            entry.cancel.cancel();
        }
    }

    /// Ends every session (server shutdown).
    pub fn cancel_all(&self) {
        for entry in self.lock().values() {
            entry.cancel.cancel();
        }
    }

    /// Every session's sender and cancel token, for one fan-out pass (access
    /// policy pushes): cloned under the lock, used after it is released.
    pub fn sessions_for_fan_out(&self) -> Vec<(Uuid, SessionSender, CancellationToken)> {
        self.lock()
            .iter()
            .map(|(id, entry)| (*id, entry.sender.clone(), entry.cancel.clone()))
            .collect()
    }

    /// Last-seen times of every connected machine, for the batched flush.
    pub fn last_seen_batch(&self) -> Vec<(Uuid, UnixSeconds)> {
        self.lock()
            .iter()
            .map(|(id, entry)| (*id, entry.last_seen))
            .collect()
    }
}

fn view_of(entry: &SessionEntry) -> ConnectedView {
    ConnectedView {
        remote_address: entry.remote_address,
        connected_at: entry.connected_at,
        last_seen: entry.last_seen,
        applied_desired_version: entry.applied_desired_version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(registry: &Registry) -> (SessionEntry, mpsc::Receiver<SessionMessage>) {
        let (sender, receiver) = mpsc::channel(1);
        (
            SessionEntry {
                session_id: registry.allocate_session_id(),
                sender,
                cancel: CancellationToken::new(),
                remote_address: SocketAddr::from(([127, 0, 0, 1], 1)),
                connected_at: 1,
                last_seen: 1,
                applied_desired_version: 0,
            },
            receiver,
        )
    }

    #[test]
    fn a_reconnect_cancels_the_old_session_and_old_unregister_is_ignored() {
        let registry = Registry::new();
        let machine = Uuid::new_v4();
        let (first, _first_rx) = entry(&registry);
        let first_cancel = first.cancel.clone();
        let first_id = first.session_id;
        registry.register(machine, first);
        let (second, _second_rx) = entry(&registry);
        let second_id = second.session_id;
        registry.register(machine, second);
        assert!(first_cancel.is_cancelled());
        assert!(registry.unregister(machine, first_id).is_none());
        assert_eq!(registry.connected_count(), 1);
        registry.touch(machine, 50);
        assert_eq!(registry.last_seen_batch(), vec![(machine, 50)]);
        assert!(registry.unregister(machine, second_id).is_some());
        assert_eq!(registry.connected_count(), 0);
    }
}
