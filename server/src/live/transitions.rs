//! Applies machine state transitions in the order they were decided: store
//! them, count them, tell the other replicas, announce them to `machines
//! watch` streams and send them to the webhooks. One task does all of it, so
//! every consumer sees the same order. A transition is decided by one
//! replica only (the one judging the machine), so it is stored and sent to
//! the webhooks once fleet-wide; the others only show it to their watchers
//! ([`announce_locally`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use crate::alerts::Alert;
use crate::live::feed::Change;
use crate::live::health::Transition;
use crate::store::StateTransitionRecord;
use crate::ServerState;

/// Events buffered per watcher before it must resynchronise.
pub const WATCH_BUFFER: usize = 4096;

/// A transition with the machine facts a watcher filters and prints by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineEvent {
    pub machine_id: Uuid,
    pub hostname: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub transition: Transition,
}

pub type EventSender = broadcast::Sender<MachineEvent>;

pub fn event_channel() -> EventSender {
    broadcast::channel(WATCH_BUFFER).0
}

fn alert_for(event: &MachineEvent) -> Alert {
    let at = std::time::SystemTime::UNIX_EPOCH
        + std::time::Duration::from_secs(event.transition.at.unsigned_abs());
    Alert {
        kind: "machine_state",
        event: json!({
            "machine": event.machine_id.to_string(),
            "hostname": event.hostname,
            "zone": event.zone,
            "labels": event.labels,
            "from": event.transition.from.as_str(),
            "to": event.transition.to.as_str(),
            "reason": event.transition.reason,
            "time": humantime::format_rfc3339_seconds(at).to_string(),
        }),
    }
}

/// Runs until every sender of `transitions` is gone.
pub async fn apply_transitions(
    state: Arc<ServerState>,
    mut transitions: mpsc::UnboundedReceiver<Transition>,
) {
    while let Some(transition) = transitions.recv().await {
        let record = StateTransitionRecord {
            machine_id: transition.machine_id,
            at: transition.at,
            from: transition.from.as_str().to_owned(),
            to: transition.to.as_str().to_owned(),
            reason: transition.reason.clone(),
        };
        if let Err(error) = state.store.record_transition(&record).await {
            tracing::error!(machine = %transition.machine_id, %error, "cannot store state transition");
        }
        state.metrics.record_transition(transition.to.as_str());
        state
            .feed
            .announce(Change::Health {
                machine: transition.machine_id,
                state: transition.to.as_str().to_owned(),
                reason: transition.reason.clone(),
                at: transition.at,
            })
            .await;
        let event = event_of(&state, transition);
        tracing::info!(
            machine = %event.machine_id,
            hostname = %event.hostname,
            from = %event.transition.from,
            to = %event.transition.to,
            reason = %event.transition.reason,
            "machine state changed"
        );
        state.alerts.publish(&alert_for(&event));
        show_to_watchers(&state, event);
    }
}

/// A transition with the machine's facts as the health tracker has them.
fn event_of(state: &ServerState, transition: Transition) -> MachineEvent {
    let facts = state.health.get(transition.machine_id);
    MachineEvent {
        machine_id: transition.machine_id,
        hostname: facts
            .as_ref()
            .map(|m| m.hostname.clone())
            .unwrap_or_default(),
        zone: facts.as_ref().map(|m| m.zone.clone()).unwrap_or_default(),
        labels: facts.map(|m| m.labels).unwrap_or_default(),
        transition,
    }
}

fn show_to_watchers(state: &ServerState, event: MachineEvent) {
    state.rollouts.machine_changed(event.machine_id);
    // No watcher is not an error.
    let _ = state.events.send(event);
}

/// A transition another replica decided (and stored and alerted): this
/// replica's watchers and rollout engine see it too.
pub fn announce_locally(state: &ServerState, transition: Transition) {
    show_to_watchers(state, event_of(state, transition));
}
