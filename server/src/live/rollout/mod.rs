//! The thin loop that applies the controller's decisions, and the engine
//! that owns the active rollouts in memory (write-through to the store).
//!
//! A pass: build each active rollout's machine views (stored progress + the
//! live registry and health tracker), ask `controller::next`, apply the
//! actions to a copy, store the copy *and* the desired images in one
//! transaction, and only then push desired states to agents and announce
//! the change. A server killed at any point therefore either never stored a
//! send (it is decided again) or stored it (the agent gets the desired image
//! on reconnect and the send is never repeated). Passes run when an agent
//! in an active rollout reports, when a machine's health changes, on an
//! operator command, and once a second (bake timers, deadlines).
//!
//! Operator commands and passes take the same lock, so a pass never
//! overwrites a pause it did not see.
//!
//! Laid out by what happens to a rollout: `create` (plan, candidates, waves,
//! the stored insert), `commands` (an operator's pause, resume, abort,
//! approve, rollback and stop-all), `pass` (one controller pass: views in,
//! actions applied, stored, then published); this file holds the engine,
//! its read side and the loop.

mod commands;
mod create;
mod pass;

use std::collections::HashSet;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{broadcast, mpsc, Mutex, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::alerts::Alert;
use crate::domain::rollout::controller;
use crate::domain::rollout::{MachineRolloutState, Rollout, RolloutError, RolloutMachine};
use crate::live::feed::Change;
use crate::store::RolloutStore;
use crate::ServerState;
use flotte_common::audit::AuditEvent;
use pass::views_for_controller;

pub use create::CreateRequest;

/// Bake timers and deadlines are checked at least this often.
const TICK: Duration = Duration::from_secs(1);
/// Who the audit log names for the controller's own decisions.
const CONTROLLER_ACTOR: &str = "rollout-controller";

/// A rollout and its machines as held in memory while it is active.
#[derive(Debug, Clone)]
struct ActiveRollout {
    rollout: Rollout,
    machines: Vec<RolloutMachine>,
}

/// Everything `rollout show` displays.
#[derive(Debug, Clone)]
pub struct RolloutDetail {
    pub rollout: Rollout,
    pub machines: Vec<RolloutMachine>,
    pub waiting_for: String,
    pub failures: usize,
    pub max_failures: usize,
}

/// The active rollouts and the means to wake the loop.
pub struct RolloutEngine {
    store: Arc<dyn RolloutStore>,
    active: Mutex<BTreeMap<Uuid, ActiveRollout>>,
    /// Machine → the active rollout holding it: a report from any other
    /// machine does not wake the loop.
    members: std::sync::Mutex<HashMap<Uuid, Uuid>>,
    wake: Notify,
    changes: broadcast::Sender<Uuid>,
    /// The controller's decisions for the audit log, and their receiver
    /// (taken by [`run`]).
    audit: mpsc::UnboundedSender<AuditEvent>,
    audit_events: std::sync::Mutex<Option<mpsc::UnboundedReceiver<AuditEvent>>>,
}

impl std::fmt::Debug for RolloutEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutEngine").finish_non_exhaustive()
    }
}

/// Machines set aside by `machines quarantine` (or remediation): a rollout
/// never swaps them. A store error is logged and read as "none", the same
/// as the store being unable to record anything else this pass.
async fn quarantined_machines(state: &ServerState) -> HashSet<Uuid> {
    crate::live::repair_state::quarantined_ids(state)
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read quarantined machines");
            HashSet::new()
        })
}

/// Machines that failed at some point (a reverted one keeps its reason).
fn failures_of(machines: &[RolloutMachine]) -> usize {
    machines
        .iter()
        .filter(|machine| {
            machine.state == MachineRolloutState::Failed || !machine.failure_reason.is_empty()
        })
        .count()
}

impl RolloutEngine {
    /// Loads the rollouts that were active when the server stopped.
    pub async fn load(store: Arc<dyn RolloutStore>) -> Result<Self, RolloutError> {
        let mut active = BTreeMap::new();
        let mut members = HashMap::new();
        for rollout in store.rollouts().await? {
            if rollout.state.is_terminal() {
                continue;
            }
            let machines = store.rollout_machines(rollout.id).await?;
            for machine in &machines {
                members.insert(machine.machine_id, rollout.id);
            }
            tracing::info!(rollout = %rollout.id, state = %rollout.state, "resuming rollout");
            active.insert(rollout.id, ActiveRollout { rollout, machines });
        }
        let (audit, audit_events) = mpsc::unbounded_channel();
        Ok(RolloutEngine {
            store,
            active: Mutex::new(active),
            members: std::sync::Mutex::new(members),
            wake: Notify::new(),
            changes: broadcast::channel(1024).0,
            audit,
            audit_events: std::sync::Mutex::new(Some(audit_events)),
        })
    }

    fn members(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Uuid>> {
        // Each critical section is one map operation.
        self.members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Something about `machine` changed (a report, a health transition):
    /// wakes the loop if an active rollout holds it. O(1), no store access.
    pub fn machine_changed(&self, machine: Uuid) {
        if self.members().contains_key(&machine) {
            self.wake.notify_one();
        }
    }

    /// Rollout ids as they change (for watch streams).
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.changes.subscribe()
    }

    /// Resolves an id or unique id prefix.
    pub async fn resolve(&self, id: &str) -> Result<Uuid, RolloutError> {
        let id = id.trim();
        if let Ok(exact) = Uuid::parse_str(id) {
            return Ok(exact);
        }
        if id.is_empty() {
            return Err(RolloutError::NotFound("(empty id)".to_owned()));
        }
        let matching: Vec<Uuid> = self
            .store
            .rollouts()
            .await?
            .iter()
            .map(|rollout| rollout.id)
            .filter(|candidate| candidate.to_string().starts_with(id))
            .collect();
        match matching.as_slice() {
            [one] => Ok(*one),
            [] => Err(RolloutError::NotFound(id.to_owned())),
            _ => Err(RolloutError::Refused(format!(
                "rollout id prefix {id:?} is ambiguous ({} rollouts)",
                matching.len()
            ))),
        }
    }

    /// Every rollout, newest first (without machines).
    pub async fn list(&self) -> Result<Vec<Rollout>, RolloutError> {
        let stored = self.store.rollouts().await?;
        let active = self.active.lock().await;
        Ok(stored
            .into_iter()
            .map(|rollout| {
                active
                    .get(&rollout.id)
                    .map_or(rollout, |current| current.rollout.clone())
            })
            .collect())
    }

    /// A rollout with its machines and what it waits for.
    pub async fn detail(
        &self,
        state: &ServerState,
        id: Uuid,
    ) -> Result<RolloutDetail, RolloutError> {
        let current = self.active.lock().await.get(&id).cloned();
        let current = match current {
            Some(active) => active,
            None => self.stored(id).await?,
        };
        Ok(detail_of(state, current.rollout, current.machines).await)
    }

    /// Tells this replica's watchers, wakes the loop, and tells the other
    /// replicas that rollout `id` changed in the store (its row, and of its
    /// machines' rows `machines`; `None`: any).
    async fn changed(&self, state: &ServerState, id: Uuid, machines: Option<Vec<Uuid>>) {
        self.wake.notify_one();
        let _ = self.changes.send(id);
        state
            .feed
            .announce(Change::Rollout {
                rollout: id,
                machines,
            })
            .await;
    }

    /// Another replica changed rollout `id`: its row, and of its machines'
    /// rows `machines` (`None`: any). A cached rollout re-reads only those
    /// rows — the leader stores a pass per wave step, and re-reading a
    /// 10 000-machine rollout after each kept every other replica's store
    /// connection and change feed busy — anything else is read whole.
    pub async fn changed_elsewhere(&self, id: Uuid, machines: Option<Vec<Uuid>>) {
        let Some(machines) = machines else {
            return self.reload(id).await;
        };
        let mut active = self.active.lock().await;
        let Some(current) = active.get_mut(&id) else {
            drop(active);
            return self.reload(id).await;
        };
        let fresh = async {
            let rollout = self.store.rollout(id).await?;
            let rows = self.store.rollout_machines_with_ids(id, &machines).await?;
            Ok::<_, crate::store::StoreError>(rollout.map(|rollout| (rollout, rows)))
        };
        match fresh.await {
            Ok(Some((rollout, rows))) => {
                current.rollout = rollout;
                let mut rows: HashMap<Uuid, RolloutMachine> =
                    rows.into_iter().map(|row| (row.machine_id, row)).collect();
                for machine in &mut current.machines {
                    if let Some(row) = rows.remove(&machine.machine_id) {
                        *machine = row;
                    }
                }
            }
            Ok(None) => {
                tracing::error!(rollout = %id, "a rollout changed elsewhere is no longer stored");
            }
            Err(error) => {
                // Kept as it was: on the leader, a pass from this copy is
                // refused by the store (stale revision) and re-reads it.
                tracing::error!(rollout = %id, %error, "cannot re-read a rollout changed elsewhere");
            }
        }
        if current.rollout.state.is_terminal() {
            if let Some(finished) = active.remove(&id) {
                self.keep_or_retire(&mut active, finished);
            }
        }
        drop(active);
        self.wake.notify_one();
        let _ = self.changes.send(id);
    }

    /// Re-reads rollout `id` from the store (another replica changed it).
    pub async fn reload(&self, id: Uuid) {
        let mut active = self.active.lock().await;
        match self.stored(id).await {
            Ok(current) => self.keep_or_retire(&mut active, current),
            Err(error) => {
                tracing::error!(rollout = %id, %error, "cannot reload a rollout changed elsewhere");
                return;
            }
        }
        drop(active);
        self.wake.notify_one();
        let _ = self.changes.send(id);
    }

    /// Re-reads every active rollout from the store (after a gap in the
    /// change feed, or when this replica starts to lead).
    pub async fn reload_all(&self) {
        let stored = match self.store.rollouts().await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::error!(%error, "cannot reload the rollouts");
                return;
            }
        };
        let mut ids: HashSet<Uuid> = self.active.lock().await.keys().copied().collect();
        ids.extend(
            stored
                .iter()
                .filter(|rollout| !rollout.state.is_terminal())
                .map(|rollout| rollout.id),
        );
        for id in ids {
            self.reload(id).await;
        }
    }

    async fn stored(&self, id: Uuid) -> Result<ActiveRollout, RolloutError> {
        let rollout = self
            .store
            .rollout(id)
            .await?
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))?;
        let machines = self.store.rollout_machines(id).await?;
        Ok(ActiveRollout { rollout, machines })
    }
}

async fn detail_of(
    state: &ServerState,
    rollout: Rollout,
    machines: Vec<RolloutMachine>,
) -> RolloutDetail {
    let now = state.clock.now_unix();
    let quarantined = quarantined_machines(state).await;
    let waiting_for = controller::waiting_for(
        &rollout,
        &views_for_controller(state, &rollout, &machines, &quarantined),
        now,
    );
    let failures = failures_of(&machines);
    let max_failures = controller::failure_threshold(&rollout, machines.len());
    RolloutDetail {
        rollout,
        machines,
        waiting_for,
        failures,
        max_failures,
    }
}

impl RolloutEngine {
    /// Sends a rollout event to the webhooks at once, and queues the
    /// controller's own decisions for the audit log (appended in order by
    /// [`run`]'s writer, so a pass never waits on the audit log's disk sync;
    /// operators' commands are audited by the admin gate).
    fn announce(
        &self,
        state: &ServerState,
        rollout: &Rollout,
        action: &str,
        detail: &str,
        actor: &str,
    ) {
        tracing::info!(rollout = %rollout.id, image = %rollout.image.reference(), state = %rollout.state, action, detail, actor, "rollout event");
        state.alerts.publish(&Alert {
            kind: "rollout",
            event: json!({
                "rollout": rollout.id.to_string(),
                "image": rollout.image.reference(),
                "action": action,
                "state": rollout.state.as_str(),
                "detail": detail,
                "actor": actor,
                "wave": rollout.current_wave + 1,
                "waves": rollout.wave_count(),
            }),
        });
        if actor == CONTROLLER_ACTOR {
            let _ = self.audit.send(AuditEvent {
                at: state.clock.now_unix(),
                actor: CONTROLLER_ACTOR.to_owned(),
                role: "server".to_owned(),
                action: action.to_owned(),
                arguments_json:
                    json!({ "rollout": rollout.id.to_string(), "image": rollout.image.reference() })
                        .to_string(),
                result: format!("ok: {detail}"),
            });
        }
    }
}

/// Appends the controller's audit events in the order they were decided.
async fn write_audit(state: Arc<ServerState>, mut events: mpsc::UnboundedReceiver<AuditEvent>) {
    while let Some(event) = events.recv().await {
        if let Err(error) = state.store.append_audit(&event).await {
            tracing::error!(%error, action = %event.action, "cannot record a rollout event in the audit log");
        }
    }
}

/// Runs passes on wake-ups and every [`TICK`] until `shutdown`, while this
/// replica leads; starting to lead, it first re-reads every rollout (the
/// former leader's last passes are in the store, not in this copy).
pub async fn run(state: Arc<ServerState>, shutdown: CancellationToken) {
    let audit_events = state
        .rollouts
        .audit_events
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(events) = audit_events {
        tokio::spawn(write_audit(Arc::clone(&state), events));
    }
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading_term = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = state.rollouts.wake.notified() => {}
            _ = ticker.tick() => {}
        }
        let Some(fence) = state.leadership.fence() else {
            leading_term = None;
            continue;
        };
        if leading_term != Some(fence.term) {
            state.rollouts.reload_all().await;
            leading_term = Some(fence.term);
        }
        state.rollouts.pass(&state, &fence).await;
        state.metrics.rollout_passes.inc();
    }
}
