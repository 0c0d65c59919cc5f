//! Revocation in memory: the deny list (certificate serials and identity
//! URIs) consulted at every TLS handshake and every RPC, and the live
//! connections of each identity, so that revoking an identity closes all its
//! connections — and with them every stream it has open — at once.
//!
//! The store holds the durable deny list; this is its in-memory mirror,
//! loaded at start and updated by whoever revokes (after the store write).
//! Locks are held for one map operation, never across an `.await`, and the
//! handshake path never touches the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How long a revoked peer's connections stay open after the revocation, so
/// that the answer to the revoking call (and a refused session's reason)
/// reach their peers first. Every RPC is refused from the instant of the
/// revocation; this only delays closing the sockets.
pub const REVOCATION_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

use tokio_util::sync::CancellationToken;

use crate::store::{DeniedEntry, DeniedKind, UnixSeconds};

#[derive(Debug, Default)]
struct DenySet {
    /// Serial (lowercase hex) → reason.
    serials: HashMap<String, String>,
    /// Identity URI → reason.
    identities: HashMap<String, String>,
}

/// Connections of one identity: connection id → its cancellation.
type IdentityConnections = HashMap<u64, CancellationToken>;

#[derive(Debug, Default)]
pub struct Revocations {
    denied: RwLock<DenySet>,
    connections: Mutex<HashMap<String, IdentityConnections>>,
    next_connection_id: AtomicU64,
}

impl Revocations {
    /// A deny list holding `entries` (from the store) and no connections.
    pub fn new(entries: &[DeniedEntry]) -> Arc<Self> {
        let revocations = Arc::new(Revocations::default());
        revocations.deny(entries);
        revocations
    }

    fn write_denied(&self) -> std::sync::RwLockWriteGuard<'_, DenySet> {
        // Every update is a single insert: a poisoned lock is still consistent.
        self.denied
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, HashMap<String, IdentityConnections>> {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds entries to the in-memory deny list (the store already has them).
    pub fn deny(&self, entries: &[DeniedEntry]) {
        let mut denied = self.write_denied();
        for entry in entries.iter().filter(|entry| !entry.value.is_empty()) {
            let map = match entry.kind {
                DeniedKind::Serial => &mut denied.serials,
                DeniedKind::Identity => &mut denied.identities,
            };
            map.entry(entry.value.clone())
                .or_insert_with(|| entry.reason.clone());
        }
    }

    /// Why a certificate (identity URI and serial) is refused, if it is.
    pub fn refusal(&self, identity_uri: &str, serial_hex: &str) -> Option<String> {
        let denied = self
            .denied
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        denied
            .identities
            .get(identity_uri)
            .or_else(|| denied.serials.get(serial_hex))
            .cloned()
    }

    /// Registers a live connection of `identity_uri`; it is cut when the
    /// identity is revoked and unregistered when the ticket is dropped.
    pub fn track(self: &Arc<Self>, identity_uri: &str) -> ConnectionTicket {
        let id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.lock_connections()
            .entry(identity_uri.to_owned())
            .or_default()
            .insert(id, cancel.clone());
        ConnectionTicket {
            revocations: Arc::clone(self),
            identity_uri: identity_uri.to_owned(),
            id,
            cancel,
        }
    }

    /// Closes every live connection of `identity_uri` now; how many there were.
    pub fn cut(&self, identity_uri: &str) -> usize {
        let connections = self.lock_connections().remove(identity_uri);
        let cut = connections.map_or(0, |connections| {
            connections.values().for_each(CancellationToken::cancel);
            connections.len()
        });
        if cut > 0 {
            tracing::info!(
                identity = identity_uri,
                connections = cut,
                "revoked identity's connections closed"
            );
        }
        cut
    }

    /// [`Revocations::cut`] after `grace` (so that a last message, such as the
    /// reason a session is refused, can reach the peer first).
    pub fn cut_after(self: &Arc<Self>, identity_uri: &str, grace: Duration) {
        let revocations = Arc::clone(self);
        let identity_uri = identity_uri.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            revocations.cut(&identity_uri);
        });
    }

    /// Applies a revocation the store has recorded: refuses `denied` from now
    /// on and closes the connections of `identity_uri` after `grace`.
    pub fn enforce(self: &Arc<Self>, denied: &[DeniedEntry], identity_uri: &str, grace: Duration) {
        self.deny(denied);
        self.cut_after(identity_uri, grace);
    }

    /// Live connections of `identity_uri`.
    #[cfg(test)]
    pub fn connection_count(&self, identity_uri: &str) -> usize {
        self.lock_connections()
            .get(identity_uri)
            .map_or(0, HashMap::len)
    }
}

/// The deny-list entries of one revocation: the same reason and time for
/// each (kind, value) target.
pub fn denial(
    reason: &str,
    at: UnixSeconds,
    targets: impl IntoIterator<Item = (DeniedKind, String)>,
) -> Vec<DeniedEntry> {
    targets
        .into_iter()
        .map(|(kind, value)| DeniedEntry {
            kind,
            value,
            reason: reason.to_owned(),
            denied_at: at,
        })
        .collect()
}

/// A registered connection: its cancellation, and its registration, which
/// ends when this is dropped (with the connection).
#[derive(Debug)]
pub struct ConnectionTicket {
    revocations: Arc<Revocations>,
    identity_uri: String,
    id: u64,
    pub cancel: CancellationToken,
}

impl Drop for ConnectionTicket {
    fn drop(&mut self) {
        let mut connections = self.revocations.lock_connections();
        if let Some(of_identity) = connections.get_mut(&self.identity_uri) {
            of_identity.remove(&self.id);
            if of_identity.is_empty() {
                connections.remove(&self.identity_uri);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: DeniedKind, value: &str) -> DeniedEntry {
        DeniedEntry {
            kind,
            value: value.into(),
            reason: format!("{value} revoked"),
            denied_at: 1,
        }
    }

    #[test]
    fn identities_and_serials_are_refused_with_their_reason() {
        let revocations = Revocations::new(&[entry(DeniedKind::Serial, "0a")]);
        assert_eq!(revocations.refusal("spiffe://td/operator/bob", "0b"), None);
        assert_eq!(
            revocations
                .refusal("spiffe://td/operator/bob", "0a")
                .as_deref(),
            Some("0a revoked")
        );
        revocations.deny(&[entry(DeniedKind::Identity, "spiffe://td/operator/bob")]);
        assert_eq!(
            revocations
                .refusal("spiffe://td/operator/bob", "0b")
                .as_deref(),
            Some("spiffe://td/operator/bob revoked")
        );
        // Empty values never deny (a machine with no previous serial).
        revocations.deny(&[entry(DeniedKind::Serial, "")]);
        assert_eq!(revocations.refusal("spiffe://td/operator/eve", ""), None);
    }

    #[test]
    fn cutting_an_identity_cancels_only_its_live_connections() {
        let revocations = Revocations::new(&[]);
        let first = revocations.track("bob");
        let second = revocations.track("bob");
        let other = revocations.track("alice");
        drop(second);
        assert_eq!(revocations.connection_count("bob"), 1);
        assert_eq!(revocations.cut("bob"), 1);
        assert!(first.cancel.is_cancelled());
        assert!(!other.cancel.is_cancelled());
        assert_eq!(revocations.connection_count("bob"), 0);
        drop(first);
        drop(other);
        assert_eq!(revocations.connection_count("alice"), 0);
    }
}
