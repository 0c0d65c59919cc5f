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

use std::collections::HashSet;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{broadcast, mpsc, Mutex, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::alerts::Alert;
use crate::domain::health::MachineState;
use crate::domain::rollout::controller::{self, apply_command, Action, Command, CommandEffect};
use crate::domain::rollout::plan::parse_plan;
use crate::domain::rollout::waves::{assign_waves, wave_stages, Candidate};
use crate::domain::rollout::{
    LiveMachine, MachineRolloutState, MachineView, Rollout, RolloutError, RolloutImage,
    RolloutMachine, RolloutState, SwapView,
};
use crate::store::{DesiredImageRecord, RolloutCreation, RolloutStore, UnixSeconds};
use crate::ServerState;
use flotte_common::audit::AuditEvent;

/// Bake timers and deadlines are checked at least this often.
const TICK: Duration = Duration::from_secs(1);
/// A pass re-asks the controller after applying actions (a wave done →
/// next wave → sends), at most this many times.
const MAX_ROUNDS_PER_PASS: usize = 16;
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

/// What an operator asks for when creating a rollout.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub image: String,
    pub plan_toml: String,
    pub dry_run: bool,
    pub actor: String,
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

fn live_of(state: &ServerState, machine: Uuid, quarantined: &HashSet<Uuid>) -> LiveMachine {
    let tracked = state.health.get(machine);
    let image = tracked
        .as_ref()
        .and_then(|tracked| tracked.last_report.as_ref())
        .and_then(|report| report.image.as_ref());
    LiveMachine {
        connected: state.registry.view(machine).is_some(),
        health: tracked
            .as_ref()
            .map_or(MachineState::Unknown, |tracked| tracked.state),
        health_since: tracked.as_ref().map_or(0, |tracked| tracked.since),
        current_digest: image
            .and_then(|image| image.current.as_ref())
            .map(|current| current.digest.clone()),
        swap: image
            .and_then(|image| image.swap.as_ref())
            .map(|swap| SwapView {
                target_digest: swap
                    .target
                    .as_ref()
                    .map(|target| target.digest.clone())
                    .unwrap_or_default(),
                step: swap.step.clone(),
                outcome: swap.outcome.clone(),
                message: swap.message.clone(),
                updated_at: swap.updated_at,
            }),
        quarantined: quarantined.contains(&machine),
    }
}

/// Stands in for the live facts of a machine the controller does not look
/// at live (see [`views_for_controller`]).
const NOT_LOOKED_AT: LiveMachine = LiveMachine {
    connected: false,
    health: MachineState::Unknown,
    health_since: 0,
    current_digest: None,
    swap: None,
    quarantined: false,
};

fn views_of(
    state: &ServerState,
    machines: &[RolloutMachine],
    quarantined: &HashSet<Uuid>,
) -> Vec<MachineView> {
    machines
        .iter()
        .map(|record| MachineView {
            record: record.clone(),
            live: live_of(state, record.machine_id, quarantined),
        })
        .collect()
}

/// The views `controller::next` needs: live facts for the machines of the
/// current wave and those in flight (every machine while rolling back);
/// the others' decisions depend on their stored state only. This keeps a
/// pass at O(wave) registry lookups on a fleet of 10 000.
fn views_for_controller(
    state: &ServerState,
    rollout: &Rollout,
    machines: &[RolloutMachine],
    quarantined: &HashSet<Uuid>,
) -> Vec<MachineView> {
    if rollout.state == RolloutState::RollingBack {
        return views_of(state, machines, quarantined);
    }
    machines
        .iter()
        .map(|record| {
            let looked_at = record.wave == rollout.current_wave || record.state.is_in_flight();
            MachineView {
                record: record.clone(),
                live: if looked_at {
                    live_of(state, record.machine_id, quarantined)
                } else {
                    NOT_LOOKED_AT
                },
            }
        })
        .collect()
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

/// What applying one round of actions changed.
#[derive(Debug, Default)]
struct Applied {
    changed: Vec<usize>,
    sends: Vec<(Uuid, DesiredImageRecord)>,
    /// Rollout-level events for webhooks and the audit log: (action, detail).
    events: Vec<(String, String)>,
}

/// Applies `actions` to `active` (pure: no I/O).
fn apply_actions(active: &mut ActiveRollout, actions: &[Action], now: UnixSeconds) -> Applied {
    let mut applied = Applied::default();
    let index: HashMap<Uuid, usize> = active
        .machines
        .iter()
        .enumerate()
        .map(|(position, machine)| (machine.machine_id, position))
        .collect();
    let rollout = &mut active.rollout;
    for action in actions {
        let mut machine_update = |machine: &Uuid, update: &mut dyn FnMut(&mut RolloutMachine)| {
            if let Some(&position) = index.get(machine) {
                update(&mut active.machines[position]);
                applied.changed.push(position);
            }
        };
        match action {
            Action::SetState { state, reason } => {
                rollout.state = *state;
                rollout.reason.clone_from(reason);
                applied
                    .events
                    .push((format!("rollout.{state}"), reason.clone()));
            }
            Action::AdvanceTo { wave } => {
                rollout.current_wave = *wave;
                rollout.wave_started_at = None;
            }
            Action::StartWave { wave } => {
                rollout.current_wave = *wave;
                rollout.wave_started_at = Some(now);
                let stage = rollout
                    .stage_of_wave(*wave)
                    .and_then(|stage| rollout.plan.stages.get(stage as usize))
                    .map(|stage| stage.name.clone())
                    .unwrap_or_default();
                for (position, machine) in active.machines.iter_mut().enumerate() {
                    if machine.wave == *wave {
                        machine.turn_at = Some(now);
                        applied.changed.push(position);
                    }
                }
                applied.events.push((
                    "rollout.wave-started".to_owned(),
                    format!(
                        "wave {} of {} (stage {stage})",
                        wave + 1,
                        rollout.wave_count()
                    ),
                ));
            }
            Action::Send { machine } => {
                let desired = rollout.image.desired();
                machine_update(machine, &mut |record| {
                    record.state = MachineRolloutState::Sent;
                    record.sent_at = Some(now);
                });
                applied.sends.push((*machine, desired));
            }
            Action::Progress { machine, state } => {
                machine_update(machine, &mut |record| record.state = *state);
            }
            Action::Commit { machine } => machine_update(machine, &mut |record| {
                record.state = MachineRolloutState::Committed;
                record.committed_at = Some(now);
                record.finished_at = Some(now);
            }),
            Action::Fail { machine, reason } => {
                let mut hostname = String::new();
                machine_update(machine, &mut |record| {
                    record.state = MachineRolloutState::Failed;
                    record.finished_at = Some(now);
                    record.failure_reason.clone_from(reason);
                    hostname.clone_from(&record.hostname);
                });
                applied.events.push((
                    "rollout.machine-failed".to_owned(),
                    format!("{hostname}: {reason}"),
                ));
            }
            Action::SendRollback { machine } => {
                let mut previous = None;
                machine_update(machine, &mut |record| {
                    record.state = MachineRolloutState::RollingBack;
                    record.sent_at = Some(now);
                    previous.clone_from(&record.previous_image);
                });
                if let Some(previous) = previous {
                    applied.sends.push((
                        *machine,
                        DesiredImageRecord {
                            rollback: true,
                            ..previous
                        },
                    ));
                }
            }
            Action::RolledBack { machine } => machine_update(machine, &mut |record| {
                record.state = MachineRolloutState::RolledBack;
                record.finished_at = Some(now);
            }),
        }
    }
    if !actions.is_empty() {
        rollout.updated_at = now;
    }
    applied.changed.sort_unstable();
    applied.changed.dedup();
    applied
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
        let (rollout, machines) = match current {
            Some(active) => (active.rollout, active.machines),
            None => {
                let rollout = self
                    .store
                    .rollout(id)
                    .await?
                    .ok_or_else(|| RolloutError::NotFound(id.to_string()))?;
                let machines = self.store.rollout_machines(id).await?;
                (rollout, machines)
            }
        };
        Ok(detail_of(state, rollout, machines).await)
    }

    /// Validates, assigns waves and (unless a dry run) stores and starts a rollout.
    pub async fn create(
        &self,
        state: &ServerState,
        request: CreateRequest,
    ) -> Result<RolloutDetail, RolloutError> {
        let plan = parse_plan(&request.plan_toml)?;
        let wanted: flotte_proto::image::ImageReference =
            request
                .image
                .parse()
                .map_err(|error: flotte_proto::image::ImageError| {
                    RolloutError::Refused(format!("image {:?}: {error}", request.image))
                })?;
        let image = state
            .store
            .image(&wanted.name, &wanted.version.to_string())
            .await?
            .ok_or_else(|| RolloutError::Refused(format!("no image {wanted}: push it first")))?;
        let machines = state.store.machines().await?;
        // A machine set aside for investigation is not part of a new rollout.
        let quarantined = quarantined_machines(state).await;
        let candidates: Vec<Candidate> = machines
            .iter()
            .filter(|machine| machine.retired_at.is_none() && !quarantined.contains(&machine.id))
            .map(|machine| Candidate {
                id: machine.id,
                hostname: machine.inventory.hostname.clone(),
                zone: machine.zone.clone(),
                labels: machine.labels.clone(),
            })
            .collect();
        let assignments = assign_waves(&plan, &candidates);
        if assignments.is_empty() {
            return Err(RolloutError::NoMachines);
        }
        let now = state.clock.now_unix();
        let rollout = Rollout {
            id: Uuid::new_v4(),
            image: RolloutImage {
                name: image.name.clone(),
                version: image.version.clone(),
                digest: image.digest.clone(),
            },
            plan,
            plan_toml: request.plan_toml.clone(),
            state: RolloutState::Pending,
            reason: format!("created by {}", request.actor),
            created_at: now,
            created_by: request.actor.clone(),
            updated_at: now,
            wave_stages: wave_stages(&assignments),
            current_wave: 0,
            wave_started_at: None,
            approved_stages: Vec::new(),
        };
        let by_id: HashMap<Uuid, &crate::store::MachineRecord> = machines
            .iter()
            .map(|machine| (machine.id, machine))
            .collect();
        let members: Vec<RolloutMachine> = assignments
            .iter()
            .map(|assignment| RolloutMachine {
                rollout_id: rollout.id,
                machine_id: assignment.machine,
                hostname: assignment.hostname.clone(),
                zone: assignment.zone.clone(),
                stage: assignment.stage,
                wave: assignment.wave,
                state: MachineRolloutState::Pending,
                previous_image: previous_image(state, by_id.get(&assignment.machine).copied()),
                turn_at: None,
                sent_at: None,
                committed_at: None,
                finished_at: None,
                failure_reason: String::new(),
            })
            .collect();
        let mut active = self.active.lock().await;
        let mut conflicts: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
        {
            let held = self.members();
            for member in &members {
                if let Some(other) = held.get(&member.machine_id) {
                    conflicts
                        .entry(*other)
                        .or_default()
                        .push(member.hostname.clone());
                }
            }
        }
        if let Some((other, hostnames)) = conflicts.into_iter().next() {
            return Err(RolloutError::Conflict {
                rollout: other,
                machines: hostnames.join(", "),
            });
        }
        if request.dry_run {
            return Ok(detail_of(state, rollout, members).await);
        }
        // The store checks again, in the insert's transaction: the map above
        // is this process's view, the store is every writer's.
        if let RolloutCreation::Overlap {
            rollout: other,
            machines,
        } = self.store.insert_rollout(&rollout, &members).await?
        {
            let hostnames: Vec<&str> = members
                .iter()
                .filter(|member| machines.contains(&member.machine_id))
                .map(|member| member.hostname.as_str())
                .collect();
            return Err(RolloutError::Conflict {
                rollout: other,
                machines: hostnames.join(", "),
            });
        }
        {
            let mut held = self.members();
            for member in &members {
                held.insert(member.machine_id, rollout.id);
            }
        }
        self.announce(
            state,
            &rollout,
            "rollout.created",
            &format!(
                "{} on {} machines in {} waves",
                rollout.image.reference(),
                members.len(),
                rollout.wave_count()
            ),
            &request.actor,
        );
        active.insert(
            rollout.id,
            ActiveRollout {
                rollout: rollout.clone(),
                machines: members.clone(),
            },
        );
        drop(active);
        self.wake.notify_one();
        let _ = self.changes.send(rollout.id);
        Ok(detail_of(state, rollout, members).await)
    }

    /// An operator's command on one rollout.
    pub async fn command(
        &self,
        state: &ServerState,
        id: Uuid,
        command: Command,
        actor: &str,
    ) -> Result<RolloutDetail, RolloutError> {
        let mut active = self.active.lock().await;
        let mut current = match active.get(&id) {
            Some(current) => current.clone(),
            None => {
                let rollout = self
                    .store
                    .rollout(id)
                    .await?
                    .ok_or_else(|| RolloutError::NotFound(id.to_string()))?;
                let machines = self.store.rollout_machines(id).await?;
                ActiveRollout { rollout, machines }
            }
        };
        let effect = apply_command(&current.rollout, &command).map_err(RolloutError::Refused)?;
        if effect == CommandEffect::State(RolloutState::RollingBack) && !active.contains_key(&id) {
            // A finished rollout comes back to life to revert its machines:
            // refuse if another active rollout holds some of them now.
            let held = self.members();
            let taken: Vec<String> = current
                .machines
                .iter()
                .filter(|machine| held.contains_key(&machine.machine_id))
                .map(|machine| machine.hostname.clone())
                .collect();
            if let Some(first) = current
                .machines
                .iter()
                .find(|m| held.contains_key(&m.machine_id))
            {
                return Err(RolloutError::Conflict {
                    rollout: held.get(&first.machine_id).copied().unwrap_or_default(),
                    machines: taken.join(", "),
                });
            }
        }
        let now = state.clock.now_unix();
        let detail = match &effect {
            CommandEffect::State(new_state) => {
                current.rollout.state = *new_state;
                current.rollout.reason = format!("{} by {actor}", command.as_str());
                format!("{} → {new_state}", command.as_str())
            }
            CommandEffect::ApproveStage(stage) => {
                current.rollout.approved_stages.push(*stage);
                let name = current
                    .rollout
                    .plan
                    .stages
                    .get(*stage as usize)
                    .map(|stage| stage.name.clone())
                    .unwrap_or_default();
                format!("stage {name} approved")
            }
        };
        current.rollout.updated_at = now;
        self.store
            .apply_rollout_pass(&current.rollout, &[], &[])
            .await?;
        self.announce(
            state,
            &current.rollout,
            &format!("rollout.{}", command.as_str()),
            &detail,
            actor,
        );
        self.keep_or_retire(&mut active, current.clone());
        drop(active);
        self.wake.notify_one();
        let _ = self.changes.send(id);
        Ok(detail_of(state, current.rollout, current.machines).await)
    }

    /// Pauses every pending or running rollout; returns those it paused.
    pub async fn stop_all(
        &self,
        state: &ServerState,
        actor: &str,
    ) -> Result<Vec<RolloutDetail>, RolloutError> {
        let ids: Vec<Uuid> = self
            .active
            .lock()
            .await
            .values()
            .filter(|active| {
                matches!(
                    active.rollout.state,
                    RolloutState::Pending | RolloutState::Running
                )
            })
            .map(|active| active.rollout.id)
            .collect();
        let mut stopped = Vec::new();
        for id in ids {
            match self.command(state, id, Command::Pause, actor).await {
                Ok(detail) => stopped.push(detail),
                // Finished or paused meanwhile: nothing to stop.
                Err(RolloutError::Refused(reason)) => {
                    tracing::info!(%reason, "stop-all skipped a rollout")
                }
                Err(error) => return Err(error),
            }
        }
        Ok(stopped)
    }

    fn keep_or_retire(&self, active: &mut BTreeMap<Uuid, ActiveRollout>, current: ActiveRollout) {
        let id = current.rollout.id;
        if current.rollout.state.is_terminal() {
            active.remove(&id);
            let mut held = self.members();
            for machine in &current.machines {
                if held.get(&machine.machine_id) == Some(&id) {
                    held.remove(&machine.machine_id);
                }
            }
        } else {
            {
                let mut held = self.members();
                for machine in &current.machines {
                    held.insert(machine.machine_id, id);
                }
            }
            active.insert(id, current);
        }
    }

    /// One pass over every active rollout (see the module docs).
    pub async fn pass(&self, state: &ServerState) {
        let mut active = self.active.lock().await;
        let ids: Vec<Uuid> = active.keys().copied().collect();
        if ids.is_empty() {
            return;
        }
        let quarantined = quarantined_machines(state).await;
        for id in ids {
            let Some(mut stored) = active.get(&id).cloned() else {
                continue;
            };
            let mut changed = false;
            // Rounds that send nothing (commits, a wave advancing) are
            // gathered and stored together with the round that sends, in
            // one transaction: one disk sync per wave transition.
            let mut next = stored.clone();
            let mut rows: std::collections::BTreeSet<usize> = Default::default();
            let mut events: Vec<(String, String)> = Vec::new();
            for round in 0..MAX_ROUNDS_PER_PASS {
                let now = state.clock.now_unix();
                let views =
                    views_for_controller(state, &next.rollout, &next.machines, &quarantined);
                let actions = controller::next(&next.rollout, &views, now);
                let applied = apply_actions(&mut next, &actions, now);
                rows.extend(applied.changed.iter().copied());
                events.extend(applied.events);
                let last_round = actions.is_empty()
                    || next.rollout.state.is_terminal()
                    || round + 1 == MAX_ROUNDS_PER_PASS;
                if applied.sends.is_empty() && !last_round {
                    continue;
                }
                if rows.is_empty()
                    && actions.is_empty()
                    && events.is_empty()
                    && next.rollout == stored.rollout
                {
                    break;
                }
                let changed_rows: Vec<RolloutMachine> = rows
                    .iter()
                    .map(|&position| next.machines[position].clone())
                    .collect();
                // Stored first, pushed second: see the module docs.
                let updated = match self
                    .store
                    .apply_rollout_pass(&next.rollout, &changed_rows, &applied.sends)
                    .await
                {
                    Ok(updated) => updated,
                    Err(error) => {
                        tracing::error!(rollout = %id, %error, "cannot store a rollout pass; retrying at the next tick");
                        break;
                    }
                };
                stored = next.clone();
                changed = true;
                rows.clear();
                state
                    .publisher
                    .rollout_changed(&updated, stored.rollout.id)
                    .await;
                for (action, detail) in events.drain(..) {
                    self.announce(state, &stored.rollout, &action, &detail, CONTROLLER_ACTOR);
                }
                if last_round {
                    break;
                }
            }
            if changed {
                self.keep_or_retire(&mut active, stored);
                let _ = self.changes.send(id);
            }
        }
    }
}

/// The image a machine runs now (as last reported), else the one it was told
/// to run: what a rollback restores.
fn previous_image(
    state: &ServerState,
    machine: Option<&crate::store::MachineRecord>,
) -> Option<DesiredImageRecord> {
    let machine = machine?;
    let reported = state
        .health
        .get(machine.id)
        .and_then(|tracked| tracked.last_report)
        .and_then(|report| report.current_image().cloned());
    match reported {
        Some(current) if !current.digest.is_empty() => Some(DesiredImageRecord {
            name: current.name,
            version: current.version,
            digest: current.digest,
            rollback: true,
        }),
        _ => machine
            .desired_image
            .clone()
            .map(|image| DesiredImageRecord {
                rollback: true,
                ..image
            }),
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

/// Runs passes on wake-ups and every [`TICK`] until `shutdown`.
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
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = state.rollouts.wake.notified() => {}
            _ = ticker.tick() => {}
        }
        state.rollouts.pass(&state).await;
        state.metrics.rollout_passes.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::rollout::plan::parse_plan;

    fn machine(rollout: Uuid, index: u128, wave: u32) -> RolloutMachine {
        crate::domain::rollout::pending_machine_for_tests(
            rollout,
            Uuid::from_u128(index),
            &format!("m{index}"),
            wave,
            "old",
        )
    }

    #[test]
    fn actions_change_a_copy_and_list_what_to_store_and_send() {
        let id = Uuid::from_u128(7);
        let mut active = ActiveRollout {
            rollout: Rollout {
                id,
                image: RolloutImage {
                    name: "app".into(),
                    version: "2.0.0".into(),
                    digest: "new".into(),
                },
                plan: parse_plan("[[stage]]\nname = \"all\"\nbatch = 1\n")
                    .unwrap_or_else(|e| panic!("{e}")),
                plan_toml: String::new(),
                state: RolloutState::Running,
                reason: String::new(),
                created_at: 1,
                created_by: "alice".into(),
                updated_at: 1,
                wave_stages: vec![0, 0],
                current_wave: 0,
                wave_started_at: None,
                approved_stages: vec![],
            },
            machines: vec![machine(id, 1, 0), machine(id, 2, 1)],
        };
        let applied = apply_actions(
            &mut active,
            &[
                Action::StartWave { wave: 0 },
                Action::Send {
                    machine: Uuid::from_u128(1),
                },
                Action::SendRollback {
                    machine: Uuid::from_u128(2),
                },
                Action::Fail {
                    machine: Uuid::from_u128(2),
                    reason: "broken".into(),
                },
            ],
            50,
        );
        assert_eq!(applied.changed, vec![0, 1]);
        assert_eq!(active.rollout.wave_started_at, Some(50));
        assert_eq!(active.machines[0].state, MachineRolloutState::Sent);
        assert_eq!(active.machines[0].turn_at, Some(50));
        assert_eq!(active.machines[0].sent_at, Some(50));
        assert_eq!(active.machines[1].state, MachineRolloutState::Failed);
        assert_eq!(active.machines[1].failure_reason, "broken");
        assert_eq!(applied.sends.len(), 2);
        assert_eq!(
            applied.sends[0],
            (Uuid::from_u128(1), active.rollout.image.desired())
        );
        assert_eq!(applied.sends[1].1.digest, "old");
        assert!(
            applied.sends[1].1.rollback,
            "a rollback allows the lower version"
        );
        let events: Vec<&str> = applied
            .events
            .iter()
            .map(|(action, _)| action.as_str())
            .collect();
        assert_eq!(
            events,
            vec!["rollout.wave-started", "rollout.machine-failed"]
        );
        assert_eq!(failures_of(&active.machines), 1);
    }
}
