//! One controller pass: each active rollout's machine views built from its
//! stored progress and the live registry and health tracker, the
//! controller's actions applied to a copy, the copy stored with the
//! desired images in one transaction, then published
//! (`state.publisher.rollout_changed`) and announced.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::{quarantined_machines, ActiveRollout, RolloutEngine, CONTROLLER_ACTOR};
use crate::domain::health::MachineState;
use crate::domain::rollout::controller::{self, Action};
use crate::domain::rollout::{
    rollback_image, LiveMachine, MachineRolloutState, MachineView, Rollout, RolloutMachine,
    RolloutState, SwapView,
};
use crate::live::feed::Change;
use crate::store::replicas::Fence;
use crate::store::{DesiredImageRecord, StoreError, UnixSeconds};
use crate::ServerState;

/// A pass re-asks the controller after applying actions (a wave done →
/// next wave → sends), at most this many times.
const MAX_ROUNDS_PER_PASS: usize = 16;

fn live_of(state: &ServerState, machine: Uuid, quarantined: &HashSet<Uuid>) -> LiveMachine {
    let tracked = state.health.get(machine);
    let image = tracked
        .as_ref()
        .and_then(|tracked| tracked.last_report.as_ref())
        .and_then(|report| report.image.as_ref());
    LiveMachine {
        connected: state.registry.view(machine).is_some() || state.replicas.held_elsewhere(machine),
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
pub(super) fn views_for_controller(
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
                let desired = DesiredImageRecord {
                    rollback: rollout.plan.policy.allows_downgrade,
                    ..rollout.image.desired()
                };
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
    /// One pass over every active rollout (see the module docs).
    pub async fn pass(&self, state: &ServerState, fence: &Fence) {
        let mut active = self.active.lock().await;
        let ids: Vec<Uuid> = active.keys().copied().collect();
        if ids.is_empty() {
            return;
        }
        let quarantined = quarantined_machines(state).await;
        let mut stale = Vec::new();
        // Each changed rollout with the machines whose rows changed: what
        // the other replicas re-read.
        let mut changed_rollouts: Vec<(Uuid, Vec<Uuid>)> = Vec::new();
        for id in ids {
            let Some(cached) = active.get(&id) else {
                continue;
            };
            // Decided on one copy; the cache gets it once stored.
            let mut next = cached.clone();
            let mut stored_rollout = next.rollout.clone();
            // Whether `next` holds exactly what is stored (nothing decided
            // since the last store, or a store failed after another one).
            let mut stored_anything = false;
            let mut unstored_decisions = false;
            let mut changed_machines: Vec<Uuid> = Vec::new();
            // Rounds that send nothing (commits, a wave advancing) are
            // gathered and stored together with the round that sends, in
            // one transaction: one disk sync per wave transition.
            let mut rows: std::collections::BTreeSet<usize> = Default::default();
            let mut events: Vec<(String, String)> = Vec::new();
            for round in 0..MAX_ROUNDS_PER_PASS {
                let now = state.clock.now_unix();
                let views =
                    views_for_controller(state, &next.rollout, &next.machines, &quarantined);
                let actions = controller::next(&next.rollout, &views, now);
                drop(views);
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
                    && next.rollout == stored_rollout
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
                    .apply_rollout_pass(&next.rollout, &changed_rows, &applied.sends, Some(fence))
                    .await
                {
                    Ok(updated) => updated,
                    Err(error @ StoreError::Conflict(_)) => {
                        // Changed through another replica (a pause, an
                        // abort): decide again on the stored row.
                        tracing::info!(rollout = %id, %error, "rollout changed meanwhile; re-reading it");
                        stale.push(id);
                        unstored_decisions = true;
                        break;
                    }
                    Err(error) => {
                        tracing::error!(rollout = %id, %error, "cannot store a rollout pass; retrying at the next tick");
                        unstored_decisions = true;
                        break;
                    }
                };
                next.rollout.revision += 1;
                stored_rollout = next.rollout.clone();
                stored_anything = true;
                changed_machines.extend(changed_rows.iter().map(|row| row.machine_id));
                rows.clear();
                state.publisher.rollout_changed(&updated, id).await;
                for (action, detail) in events.drain(..) {
                    self.announce(state, &next.rollout, &action, &detail, CONTROLLER_ACTOR);
                }
                if last_round {
                    break;
                }
            }
            if !stored_anything {
                continue;
            }
            changed_rollouts.push((id, changed_machines));
            if unstored_decisions {
                // `next` holds decisions that were not stored on top of
                // some that were: the cache is read again from the store.
                if !stale.contains(&id) {
                    stale.push(id);
                }
            } else {
                self.keep_or_retire(&mut active, next);
            }
        }
        drop(active);
        for (id, machines) in changed_rollouts {
            let _ = self.changes.send(id);
            changed_machines_announce(state, id, machines).await;
        }
        for id in stale {
            self.reload(id).await;
        }
    }
}

/// Tells the other replicas which rows of rollout `id` a pass stored.
async fn changed_machines_announce(state: &ServerState, id: Uuid, mut machines: Vec<Uuid>) {
    machines.sort_unstable();
    machines.dedup();
    state
        .feed
        .announce(Change::Rollout {
            rollout: id,
            machines: Some(machines),
        })
        .await;
}

/// The image a machine runs now (as last reported), else the one it was told
/// to run: what a rollback restores (the choice is `rollback_image`).
pub(super) fn previous_image(
    state: &ServerState,
    machine: Option<&crate::store::MachineRecord>,
) -> Option<DesiredImageRecord> {
    let machine = machine?;
    let report = state
        .health
        .get(machine.id)
        .and_then(|tracked| tracked.last_report);
    rollback_image(
        report.as_ref().and_then(|report| report.current_image()),
        machine.desired_image.as_ref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::rollout::plan::parse_plan;
    use crate::domain::rollout::RolloutImage;
    use crate::live::rollout::failures_of;

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
                revision: 0,
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
