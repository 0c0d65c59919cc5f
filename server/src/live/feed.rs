//! Changes crossing replicas: after a write, the replica that made it
//! announces what changed on the store's change feed (PostgreSQL
//! `NOTIFY`); every other replica reloads that from the store and applies
//! it to what it holds — the sessions of its agents, its deny list and open
//! connections, its copy of the active rollouts, its view of machine states.
//!
//! A message names *what* changed, never the new value: the store is the
//! truth, so a message applied late, twice or out of order is harmless.
//! The feed is lossy (a lost database connection, a lagging subscriber):
//! [`FeedEvent::Resynchronise`] makes a replica reload everything it caches
//! and push every session it holds its whole state again.
//!
//! With one server on SQLite the feed loops back in-process and a replica
//! ignores its own messages, so nothing here costs anything.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::health::{ImageStatus, MachineState};
use crate::live::revocation::REVOCATION_GRACE;
use crate::store::replicas::{FeedEvent, ReplicaStore, FEED_MESSAGE_MAX_BYTES};
use crate::store::UnixSeconds;
use crate::ServerState;

/// Machine ids per message: 36 bytes each keeps a message far below the
/// feed's size limit.
const MACHINES_PER_MESSAGE: usize = 150;

/// What changed, as one replica tells the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Machines' stored rows changed (labels, image, quarantine).
    Machines { machines: Vec<Uuid> },
    /// A rollout stored new desired images for `machines`.
    RolloutPush { rollout: Uuid, machines: Vec<Uuid> },
    /// A rollout's row changed (a pass or an operator's command), and of
    /// its machines' rows those in `machines` — `None` (a new rollout, or a
    /// message from a replica that does not list them): any of them.
    Rollout {
        rollout: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        machines: Option<Vec<Uuid>>,
    },
    /// Access inputs (users, keys, grants) changed.
    Access,
    /// A machine may not keep its session (decommissioned).
    Refuse { machine: Uuid, reason: String },
    /// The deny list grew: refuse these from now on and cut the
    /// connections of `identity_uri`.
    Denied { identity_uri: String },
    /// An operator asked a machine to verify (or restore) its image.
    ImageCommand {
        machine: Uuid,
        request_id: String,
        restore: bool,
    },
    /// A machine's image status changed (a swap's step, its current
    /// image), as reported to the replica holding its session.
    Image {
        machine: Uuid,
        image: Box<ImageStatus>,
    },
    /// A machine's health state changed, decided by the replica holding
    /// its session (or the leader, for machines with no session).
    Health {
        machine: Uuid,
        state: String,
        reason: String,
        at: UnixSeconds,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    origin: String,
    #[serde(flatten)]
    change: Change,
}

impl Change {
    /// Splits a change about many machines into messages of a bounded size.
    fn split(self) -> Vec<Change> {
        match self {
            Change::Machines { machines } if machines.len() > MACHINES_PER_MESSAGE => machines
                .chunks(MACHINES_PER_MESSAGE)
                .map(|chunk| Change::Machines {
                    machines: chunk.to_vec(),
                })
                .collect(),
            Change::RolloutPush { rollout, machines } if machines.len() > MACHINES_PER_MESSAGE => {
                machines
                    .chunks(MACHINES_PER_MESSAGE)
                    .map(|chunk| Change::RolloutPush {
                        rollout,
                        machines: chunk.to_vec(),
                    })
                    .collect()
            }
            Change::Rollout {
                rollout,
                machines: Some(machines),
            } if machines.len() > MACHINES_PER_MESSAGE => machines
                .chunks(MACHINES_PER_MESSAGE)
                .map(|chunk| Change::Rollout {
                    rollout,
                    machines: Some(chunk.to_vec()),
                })
                .collect(),
            Change::Refuse { machine, reason } => vec![Change::Refuse {
                machine,
                reason: cut_to(reason, 1024),
            }],
            Change::Image { machine, mut image } => {
                if let Some(swap) = image.swap.as_mut() {
                    // The failed checks' outputs stay with the holder.
                    swap.checks.clear();
                    swap.message = cut_to(std::mem::take(&mut swap.message), 1024);
                }
                vec![Change::Image { machine, image }]
            }
            Change::Health {
                machine,
                state,
                reason,
                at,
            } => vec![Change::Health {
                machine,
                state,
                reason: cut_to(reason, 1024),
                at,
            }],
            other => vec![other],
        }
    }
}

/// `text` cut to at most `limit` bytes on a character boundary.
fn cut_to(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// This replica's end of the change feed.
pub struct Feed {
    origin: String,
    store: Arc<dyn ReplicaStore>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Feed {
    pub fn new(origin: &str, store: Arc<dyn ReplicaStore>) -> Arc<Self> {
        Arc::new(Feed {
            origin: origin.to_owned(),
            store,
        })
    }

    /// Tells the other replicas about `change` (already stored). A failure
    /// is logged: the others catch up at their next resynchronisation.
    pub async fn announce(&self, change: Change) {
        for change in change.split() {
            let envelope = Envelope {
                origin: self.origin.clone(),
                change,
            };
            let message = match serde_json::to_string(&envelope) {
                Ok(message) if message.len() <= FEED_MESSAGE_MAX_BYTES => message,
                Ok(message) => {
                    tracing::error!(
                        bytes = message.len(),
                        "a change is too big for the feed; replicas resynchronise later"
                    );
                    continue;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot encode a change for the feed");
                    continue;
                }
            };
            if let Err(error) = self.store.announce(&message).await {
                tracing::warn!(%error, "cannot announce a change to the other replicas");
            }
        }
    }
}

/// The change in `message` if another replica than `origin` sent it and it
/// decodes.
fn decode_from_another(origin: &str, message: &str) -> Option<Change> {
    match serde_json::from_str::<Envelope>(message) {
        Ok(envelope) if envelope.origin == origin => None,
        Ok(envelope) => Some(envelope.change),
        Err(error) => {
            tracing::warn!(%error, "ignoring an undecodable change-feed message");
            None
        }
    }
}

/// Applies the other replicas' changes until `shutdown`.
pub async fn run_feed(state: Arc<ServerState>, shutdown: CancellationToken) {
    let mut events = state.replica_store.subscribe();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(FeedEvent::Message(message)) => {
                if let Some(change) = decode_from_another(&state.feed.origin, &message) {
                    apply(&state, change).await;
                }
            }
            Ok(FeedEvent::Resynchronise) | Err(RecvError::Lagged(_)) => {
                resynchronise(&state).await;
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Applies one change made by another replica.
async fn apply(state: &Arc<ServerState>, change: Change) {
    match change {
        Change::Machines { machines } => {
            state.publisher.push_stored_states(&machines).await;
        }
        Change::RolloutPush { rollout, machines } => {
            state
                .publisher
                .rollout_pushed_elsewhere(rollout, &machines)
                .await;
        }
        Change::Rollout { rollout, machines } => {
            state.rollouts.changed_elsewhere(rollout, machines).await;
        }
        Change::Access => state.publisher.access_changed_elsewhere().await,
        Change::Refuse { machine, reason } => {
            state.publisher.refuse_held_session(machine, reason).await;
        }
        Change::Denied { identity_uri } => match state.store.denied_entries().await {
            Ok(entries) => {
                state
                    .revocations
                    .enforce(&entries, &identity_uri, REVOCATION_GRACE);
            }
            Err(error) => tracing::error!(%error, "cannot reload the deny list"),
        },
        Change::ImageCommand {
            machine,
            request_id,
            restore,
        } => {
            state
                .publisher
                .image_command_if_held(machine, request_id, restore)
                .await;
        }
        Change::Image { machine, image } => {
            track(state, machine).await;
            state.health.adopt_image(machine, *image);
            state.rollouts.machine_changed(machine);
        }
        Change::Health {
            machine,
            state: machine_state,
            reason,
            at,
        } => {
            let Some(machine_state) = MachineState::parse(&machine_state) else {
                tracing::warn!(state = %machine_state, "ignoring an unknown machine state from the feed");
                return;
            };
            track(state, machine).await;
            if let Some(transition) = state.health.adopt(machine, machine_state, &reason, at) {
                crate::live::transitions::announce_locally(state, transition);
            }
        }
    }
}

/// How often held sessions are compared with the stored desired states.
const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Anti-entropy for what the feed may have lost: a replica that stored a
/// change and died before announcing it leaves an agent held elsewhere
/// behind the store. Every [`RECONCILE_EVERY`], each held session whose
/// agent acknowledged an older desired-state version than the stored one,
/// in two rounds running (so an ordinary push in flight is not repeated),
/// gets its whole state again.
pub async fn reconcile_held_sessions(state: Arc<ServerState>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(RECONCILE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lagging_before: std::collections::HashSet<Uuid> = Default::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let held = state.registry.views();
        if held.is_empty() {
            continue;
        }
        let machines = match state.store.machines().await {
            Ok(machines) => machines,
            Err(error) => {
                tracing::warn!(%error, "cannot compare sessions with the stored desired states");
                continue;
            }
        };
        let applied: std::collections::HashMap<Uuid, u64> = held
            .iter()
            .map(|(machine, view)| (*machine, view.applied_desired_version))
            .collect();
        let stored: Vec<(Uuid, u64)> = machines
            .iter()
            .map(|machine| (machine.id, machine.desired_version))
            .collect();
        let lagging = agents_behind(&applied, &stored);
        let repeat: Vec<Uuid> = lagging.intersection(&lagging_before).copied().collect();
        if !repeat.is_empty() {
            tracing::info!(
                machines = repeat.len(),
                "agents behind the stored desired state; pushing it again"
            );
            state.publisher.push_stored_states(&repeat).await;
        }
        lagging_before = lagging;
    }
}

/// The held machines whose agents acknowledged an older desired-state
/// version than the stored one.
fn agents_behind(
    applied: &std::collections::HashMap<Uuid, u64>,
    stored: &[(Uuid, u64)],
) -> std::collections::HashSet<Uuid> {
    stored
        .iter()
        .filter(|(machine, desired)| {
            applied
                .get(machine)
                .is_some_and(|version| version < desired)
        })
        .map(|(machine, _)| *machine)
        .collect()
}

/// Makes sure the health tracker knows `machine`: one enrolled through
/// another replica after this one started is read from the store, so that
/// its state and image status decided elsewhere have somewhere to land (the
/// leader's rollout engine reads them).
async fn track(state: &ServerState, machine: Uuid) {
    if state.health.get(machine).is_some() {
        return;
    }
    match state.store.machine(machine).await {
        Ok(Some(record)) => state.health.upsert(&record, state.clock.now_unix()),
        Ok(None) => {}
        Err(error) => tracing::warn!(%machine, %error, "cannot read a machine changed elsewhere"),
    }
}

/// Reloads everything this replica caches from the store, after messages
/// may have been lost.
async fn resynchronise(state: &Arc<ServerState>) {
    tracing::info!("resynchronising with the store");
    match state.store.denied_entries().await {
        Ok(entries) => state.revocations.deny(&entries),
        Err(error) => tracing::error!(%error, "cannot reload the deny list"),
    }
    state.rollouts.reload_all().await;
    match state.store.machines().await {
        Ok(machines) => {
            for machine in &machines {
                let Some(machine_state) = MachineState::parse(&machine.state) else {
                    continue;
                };
                if state.registry.sender(machine.id).is_some() {
                    continue; // judged here, from its own reports
                }
                // Enrolled elsewhere since this replica started, perhaps.
                state.health.upsert(machine, state.clock.now_unix());
                if let Some(transition) = state.health.adopt(
                    machine.id,
                    machine_state,
                    &machine.state_reason,
                    machine.state_since,
                ) {
                    crate::live::transitions::announce_locally(state, transition);
                }
            }
        }
        Err(error) => tracing::error!(%error, "cannot reload machine states"),
    }
    state.publisher.resynchronise_held_sessions().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_changes_are_split_into_messages_under_the_feed_limit() {
        let machines: Vec<Uuid> = (0..1000u128).map(Uuid::from_u128).collect();
        let parts = Change::RolloutPush {
            rollout: Uuid::from_u128(7),
            machines: machines.clone(),
        }
        .split();
        assert_eq!(parts.len(), 7);
        let mut rejoined = Vec::new();
        for part in parts {
            let message = serde_json::to_string(&Envelope {
                origin: "replica-with-a-long-name".into(),
                change: part.clone(),
            })
            .unwrap();
            assert!(message.len() <= FEED_MESSAGE_MAX_BYTES, "{}", message.len());
            let Change::RolloutPush { machines, .. } = part else {
                panic!("split changed the kind")
            };
            rejoined.extend(machines);
        }
        assert_eq!(rejoined, machines);
        let rows = Change::Rollout {
            rollout: Uuid::from_u128(7),
            machines: Some(machines.clone()),
        }
        .split();
        assert_eq!(rows.len(), 7, "a pass naming a whole wave is split too");
        let whole = Change::Rollout {
            rollout: Uuid::from_u128(7),
            machines: None,
        };
        assert_eq!(whole.clone().split(), vec![whole]);
        let long_reason = "é".repeat(5000);
        let parts = Change::Refuse {
            machine: Uuid::nil(),
            reason: long_reason,
        }
        .split();
        let [Change::Refuse { reason, .. }] = &parts[..] else {
            panic!("a refusal is one message")
        };
        assert!(reason.len() <= 1024 && reason.starts_with('é'));
    }

    #[test]
    fn only_held_agents_behind_the_store_are_pushed_again() {
        let held = |id: u128| Uuid::from_u128(id);
        let applied = std::collections::HashMap::from([(held(1), 3), (held(2), 5), (held(3), 7)]);
        let stored = [
            (held(1), 4), // behind: pushed again
            (held(2), 5), // up to date
            (held(3), 6), // ahead of the store (a newer ack raced): left alone
            (held(4), 9), // not held here
        ];
        let behind = agents_behind(&applied, &stored);
        assert_eq!(behind, std::collections::HashSet::from([held(1)]));
    }

    #[test]
    fn a_replica_ignores_its_own_messages_and_garbage() {
        let own = serde_json::to_string(&Envelope {
            origin: "a".into(),
            change: Change::Access,
        })
        .unwrap();
        let other = own.replace("\"a\"", "\"b\"");
        assert_eq!(decode_from_another("a", &own), None);
        assert_eq!(decode_from_another("a", &other), Some(Change::Access));
        // A rollout change that does not list rows means any of them.
        let unlisted = format!(
            "{{\"origin\":\"b\",\"kind\":\"rollout\",\"rollout\":\"{}\"}}",
            Uuid::from_u128(7)
        );
        assert_eq!(
            decode_from_another("a", &unlisted),
            Some(Change::Rollout {
                rollout: Uuid::from_u128(7),
                machines: None
            })
        );
        let unknown = "{\"origin\":\"b\",\"kind\":\"unknown\"}";
        assert_eq!(decode_from_another("a", unknown), None);
        assert_eq!(decode_from_another("a", "not json"), None);
    }
}
