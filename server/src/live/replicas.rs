//! This replica among the others: its lease (renewed every
//! [`RENEW_EVERY`]), the sessions it holds as the store records them, and
//! which machines other live replicas hold — the machines whose liveness
//! this replica must not judge.
//!
//! Session claims are written by one task in the order sessions open and
//! close, so a quick reconnect never leaves a stale release after a claim.
//! A lost write only costs accuracy of `status` until the session's next
//! claim; liveness of a machine is judged by its holder from its reports.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::replicas::{ReplicaRegistration, ReplicaStore};
use crate::store::UnixSeconds;

/// How long a replica's lease lasts without renewal.
pub const REPLICA_LEASE: Duration = Duration::from_secs(6);
/// How often a replica renews its lease and re-reads who holds what.
const RENEW_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug)]
enum SessionChange {
    Opened(Uuid, UnixSeconds),
    Closed(Uuid),
}

/// This replica's place in the replica set.
pub struct ReplicaSet {
    registration: ReplicaRegistration,
    store: Arc<dyn ReplicaStore>,
    session_changes: mpsc::UnboundedSender<SessionChange>,
    session_change_receiver: Mutex<Option<mpsc::UnboundedReceiver<SessionChange>>>,
    /// Machines whose sessions another live replica holds.
    held_elsewhere: Mutex<HashSet<Uuid>>,
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSet")
            .field("registration", &self.registration)
            .finish_non_exhaustive()
    }
}

impl ReplicaSet {
    pub fn new(registration: ReplicaRegistration, store: Arc<dyn ReplicaStore>) -> Arc<Self> {
        let (session_changes, receiver) = mpsc::unbounded_channel();
        Arc::new(ReplicaSet {
            registration,
            store,
            session_changes,
            session_change_receiver: Mutex::new(Some(receiver)),
            held_elsewhere: Mutex::new(HashSet::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.registration.name
    }

    fn held_elsewhere_lock(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        // One assignment or lookup per critical section.
        self.held_elsewhere
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An agent session opened here.
    pub fn session_opened(&self, machine: Uuid, now: UnixSeconds) {
        self.held_elsewhere_lock().remove(&machine);
        // The writer lives as long as the server.
        let _ = self
            .session_changes
            .send(SessionChange::Opened(machine, now));
    }

    /// An agent session here ended.
    pub fn session_closed(&self, machine: Uuid) {
        let _ = self.session_changes.send(SessionChange::Closed(machine));
    }

    /// Whether another live replica holds `machine`'s session (as last read).
    pub fn held_elsewhere(&self, machine: Uuid) -> bool {
        self.held_elsewhere_lock().contains(&machine)
    }

    /// Registers this replica (forgetting the sessions of its previous
    /// run), then renews its lease and re-reads the session holders until
    /// `shutdown`; removes itself at the end.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if let Err(error) = self.store.release_sessions_of(self.name()).await {
            tracing::warn!(%error, "cannot forget this replica's previous sessions");
        }
        let receiver = self
            .session_change_receiver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(receiver) = receiver {
            tokio::spawn(write_session_changes(
                Arc::clone(&self.store),
                self.name().to_owned(),
                receiver,
            ));
        }
        let mut ticker = tokio::time::interval(RENEW_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            if let Err(error) = self
                .store
                .renew_replica(&self.registration, REPLICA_LEASE)
                .await
            {
                tracing::warn!(%error, "cannot renew this replica's lease");
            }
            match self.store.live_session_holders().await {
                Ok(holders) => {
                    let elsewhere = holders
                        .into_iter()
                        .filter(|(_, replica)| replica != self.name())
                        .map(|(machine, _)| machine)
                        .collect();
                    *self.held_elsewhere_lock() = elsewhere;
                }
                Err(error) => tracing::warn!(%error, "cannot read who holds which session"),
            }
        }
        if let Err(error) = self.store.remove_replica(self.name()).await {
            tracing::warn!(%error, "cannot remove this replica from the store");
        }
    }
}

async fn write_session_changes(
    store: Arc<dyn ReplicaStore>,
    replica: String,
    mut changes: mpsc::UnboundedReceiver<SessionChange>,
) {
    while let Some(change) = changes.recv().await {
        let written = match change {
            SessionChange::Opened(machine, since) => {
                store.claim_session(machine, &replica, since).await
            }
            SessionChange::Closed(machine) => store.release_session(machine, &replica).await,
        };
        if let Err(error) = written {
            tracing::warn!(%error, "cannot record a session change");
        }
    }
}
