//! Which replica runs the leader-only loops (the rollout engine's passes
//! and remediation): a lease in the store, taken and renewed every
//! [`RENEW_EVERY`], lasting [`LEADER_LEASE`].
//!
//! This replica believes it leads only while its last renewal is younger
//! than the lease minus [`SAFETY_MARGIN`]: a replica cut off from the store
//! stops acting before the store lets another replica take over. Belief is
//! not enough for a write, though: every write of a leader-only loop
//! carries the [`Fence`] and the store refuses it once the term is over.
//! With one server on SQLite the lease is always free, so the one process
//! leads from its first second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::replicas::{Fence, ReplicaStore};

/// How long a taken lease lasts in the store.
pub const LEADER_LEASE: Duration = Duration::from_secs(5);
/// How often the leader renews it and the others try to take it.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How long before the store's expiry a leader that could not renew stops
/// acting.
const SAFETY_MARGIN: Duration = Duration::from_millis(1500);

/// This replica's view of the leadership.
#[derive(Debug)]
pub struct Leadership {
    replica: String,
    current: watch::Sender<Option<Fence>>,
}

/// What to believe after a renewal attempt, given the last success (pure).
fn belief_after(
    attempt: Option<Option<Fence>>,
    held: Option<(Fence, Instant)>,
    now: Instant,
) -> Option<(Fence, Instant)> {
    match attempt {
        Some(Some(fence)) => Some((fence, now)),
        Some(None) => None,
        // The store could not be asked: keep leading only while the last
        // renewal is surely still running in the store.
        None => held.filter(|(_, renewed)| {
            now.duration_since(*renewed) < LEADER_LEASE.saturating_sub(SAFETY_MARGIN)
        }),
    }
}

impl Leadership {
    pub fn new(replica: &str) -> Arc<Self> {
        Arc::new(Leadership {
            replica: replica.to_owned(),
            current: watch::channel(None).0,
        })
    }

    /// The fence to write with, if this replica leads now.
    pub fn fence(&self) -> Option<Fence> {
        self.current.borrow().clone()
    }

    /// Takes and renews the lease until `shutdown`, then gives it up.
    pub async fn run(self: Arc<Self>, store: Arc<dyn ReplicaStore>, shutdown: CancellationToken) {
        let mut held: Option<(Fence, Instant)> = None;
        let mut ticker = tokio::time::interval(RENEW_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let attempt = match tokio::time::timeout(
                RENEW_EVERY,
                store.try_lead(&self.replica, LEADER_LEASE),
            )
            .await
            {
                Ok(Ok(result)) => Some(result),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot renew the leader lease");
                    None
                }
                Err(_) => {
                    tracing::warn!("renewing the leader lease timed out");
                    None
                }
            };
            let was = held.as_ref().map(|(fence, _)| fence.term);
            held = belief_after(attempt, held, Instant::now());
            let now = held.as_ref().map(|(fence, _)| fence.term);
            if was != now {
                match &now {
                    Some(term) => tracing::info!(term, "this replica leads now"),
                    None => tracing::info!("this replica does not lead any more"),
                }
                self.current
                    .send_replace(held.as_ref().map(|(fence, _)| fence.clone()));
            }
        }
        if let Some((fence, _)) = held {
            self.current.send_replace(None);
            if let Err(error) = store.step_down(&fence).await {
                tracing::warn!(%error, "cannot give the leader lease up");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(term: i64) -> Fence {
        Fence {
            holder: "a".into(),
            term,
        }
    }

    #[test]
    fn a_leader_that_cannot_reach_the_store_stops_before_its_lease_ends() {
        let start = Instant::now();
        let held = Some((fence(3), start));
        let cases = [
            // (attempt, elapsed since the last renewal, expected term)
            (Some(Some(fence(4))), 0, Some(4)),
            (Some(None), 0, None),
            (None, 1000, Some(3)),
            (None, 3400, Some(3)),
            (None, 3600, None),
            (None, 10_000, None),
        ];
        for (attempt, elapsed_ms, expected) in cases {
            let now = start + Duration::from_millis(elapsed_ms);
            let belief = belief_after(attempt.clone(), held.clone(), now);
            assert_eq!(
                belief.map(|(fence, _)| fence.term),
                expected,
                "{attempt:?} after {elapsed_ms} ms"
            );
        }
        assert_eq!(belief_after(None, None, start), None);
    }
}
