//! The rollout controller's decisions: a pure function of the stored rollout,
//! the views of its machines (stored progress + live registry and health)
//! and the time. It returns actions; `runner` applies them (store first,
//! then pushes). Nothing here does I/O, so every rule is a table case below.
//!
//! Rules, in the order `next` applies them:
//! 1. In-flight machines follow what their agent reports: progress, commit,
//!    failure; one not committed within `machine_deadline` of its turn fails
//!    (so one stuck or offline machine never blocks the fleet).
//! 2. A machine committed in the current wave that turns unhealthy
//!    (degraded, down, unreachable) counts as failed.
//! 3. Reaching `max_failures` halts: `on_failure = rollback` starts the
//!    rollback, `halt` fails the rollout where it is.
//! 4. The current wave's machines are sent their image only when they are
//!    connected and operational; the next wave starts once every machine of
//!    this one is final, the stage's bake time has passed since the last of
//!    them finished, and the committed ones are operational; after the last
//!    wave of a stage with `approval`, the rollout waits for `rollout
//!    approve` before going on.
//! 5. Rolling back reverts the machines that took the new image to the image
//!    each ran before (newest wave first), then ends `rolled_back`.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::plan::OnFailure;
use super::{MachineRolloutState, MachineView, Rollout, RolloutState};
use crate::domain::health::MachineState;
use crate::store::UnixSeconds;

/// A machine whose health was already bad when it committed (a stale report)
/// gets this long to turn operational before it counts as failed.
pub const HEALTH_SETTLE_SECONDS: i64 = 10;

/// One decision; the runner applies a pass's actions in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SetState {
        state: RolloutState,
        reason: String,
    },
    /// `current_wave = wave`, not started yet (it may wait for approval).
    AdvanceTo {
        wave: u32,
    },
    /// `current_wave = wave`, started now; its machines' turn begins now.
    StartWave {
        wave: u32,
    },
    /// Store the rollout's image as the machine's desired image, then push it.
    Send {
        machine: Uuid,
    },
    Progress {
        machine: Uuid,
        state: MachineRolloutState,
    },
    Commit {
        machine: Uuid,
    },
    Fail {
        machine: Uuid,
        reason: String,
    },
    /// Store the machine's previous image (marked rollback), then push it.
    SendRollback {
        machine: Uuid,
    },
    RolledBack {
        machine: Uuid,
    },
}

/// An operator's command on a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Abort,
    Approve,
    Rollback,
}

impl Command {
    pub fn as_str(&self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Abort => "abort",
            Command::Approve => "approve",
            Command::Rollback => "rollback",
        }
    }
}

/// The effect of a command: a new state, or a stage approved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandEffect {
    State(RolloutState),
    ApproveStage(u32),
}

/// Whether `command` applies to `rollout` now, and what it does; a refusal
/// says why (the API answers it as `FailedPrecondition`).
pub fn apply_command(rollout: &Rollout, command: &Command) -> Result<CommandEffect, String> {
    use RolloutState::*;
    let state = rollout.state;
    let refuse = || {
        Err(format!(
            "cannot {} rollout {}: it is {}",
            command.as_str(),
            rollout.id,
            state
        ))
    };
    match command {
        Command::Pause => match state {
            Pending | Running => Ok(CommandEffect::State(Paused)),
            _ => refuse(),
        },
        Command::Resume => match state {
            Paused => Ok(CommandEffect::State(Running)),
            _ => refuse(),
        },
        Command::Abort => match state {
            Pending | Running | Paused | RollingBack => Ok(CommandEffect::State(Aborted)),
            _ => refuse(),
        },
        Command::Rollback => match state {
            Pending | Running | Paused | Failed | Succeeded => {
                Ok(CommandEffect::State(RollingBack))
            }
            _ => refuse(),
        },
        Command::Approve => {
            if state.is_terminal() || state == RollingBack {
                return refuse();
            }
            // The first stage at or after the current wave's whose gate is
            // still closed.
            let from = rollout.stage_of_wave(rollout.current_wave).unwrap_or(0);
            let gated = rollout
                .plan
                .stages
                .iter()
                .enumerate()
                .skip(from as usize)
                .map(|(index, stage)| (u32::try_from(index).unwrap_or(u32::MAX), stage))
                .find(|(index, stage)| stage.approval && !rollout.approved_stages.contains(index));
            match gated {
                Some((index, _)) => Ok(CommandEffect::ApproveStage(index)),
                None => Err(format!(
                    "rollout {} has no stage waiting for approval",
                    rollout.id
                )),
            }
        }
    }
}

/// The failure count that halts a rollout of `total` machines.
pub fn failure_threshold(rollout: &Rollout, total: usize) -> usize {
    rollout.plan.policy.max_failures.of(total).max(1)
}

fn is_unhealthy(state: MachineState) -> bool {
    matches!(
        state,
        MachineState::Degraded | MachineState::Down | MachineState::Unreachable
    )
}

/// The agent's swap towards `digest` that started after `since`, if any.
fn swap_towards<'a>(
    view: &'a MachineView,
    digest: &str,
    since: Option<UnixSeconds>,
) -> Option<&'a super::SwapView> {
    view.live.swap.as_ref().filter(|swap| {
        swap.target_digest == digest && since.is_none_or(|since| swap.updated_at >= since)
    })
}

/// Only a connected, operational machine that is not quarantined is sent
/// an image when its turn comes; the others are waited for until their
/// deadline.
fn may_be_swapped(view: &MachineView) -> bool {
    view.live.connected && view.live.health == MachineState::Operational && !view.live.quarantined
}

fn swap_in_progress(view: &MachineView) -> bool {
    view.live
        .swap
        .as_ref()
        .is_some_and(|swap| swap.outcome == "in_progress")
}

/// The machine state an agent's swap step maps to.
fn state_of_step(step: &str) -> MachineRolloutState {
    match step {
        "switching" | "restarting" | "rolling_back" => MachineRolloutState::Switching,
        "verifying" | "committing" => MachineRolloutState::Verifying,
        _ => MachineRolloutState::Downloading,
    }
}

fn deadline_passed(rollout: &Rollout, started: Option<UnixSeconds>, now: UnixSeconds) -> bool {
    let deadline = i64::try_from(rollout.plan.policy.machine_deadline_seconds).unwrap_or(i64::MAX);
    started.is_some_and(|started| now >= started.saturating_add(deadline))
}

/// Rule 1 for one machine going forward: what its agent's report means.
fn observe_forward(
    rollout: &Rollout,
    view: &MachineView,
    now: UnixSeconds,
    enforce_deadlines: bool,
) -> Option<Action> {
    let record = &view.record;
    let machine = record.machine_id;
    let digest = &rollout.image.digest;
    if record.state.is_in_flight() {
        if view.live.current_digest.as_deref() == Some(digest.as_str()) && !swap_in_progress(view) {
            return Some(Action::Commit { machine });
        }
        if let Some(swap) = swap_towards(view, digest, record.sent_at) {
            match swap.outcome.as_str() {
                "failed" => {
                    return Some(Action::Fail {
                        machine,
                        reason: format!("swap failed at {}: {}", swap.step, swap.message),
                    })
                }
                "in_progress" => {
                    let state = state_of_step(&swap.step);
                    let expired =
                        enforce_deadlines && deadline_passed(rollout, record.turn_at, now);
                    if state != record.state && !expired {
                        return Some(Action::Progress { machine, state });
                    }
                }
                _ => {}
            }
        }
        if enforce_deadlines && deadline_passed(rollout, record.turn_at, now) {
            return Some(Action::Fail {
                machine,
                reason: format!(
                    "not committed within machine_deadline ({} s); last state {}",
                    rollout.plan.policy.machine_deadline_seconds, record.state
                ),
            });
        }
        return None;
    }
    if record.state == MachineRolloutState::Pending
        && record.wave == rollout.current_wave
        && enforce_deadlines
        && deadline_passed(rollout, record.turn_at, now)
    {
        return Some(Action::Fail {
            machine,
            reason: format!(
                "never operational and connected within machine_deadline ({} s) of its turn (last seen {}{})",
                rollout.plan.policy.machine_deadline_seconds,
                view.live.health,
                if view.live.connected { "" } else { ", disconnected" }
            ),
        });
    }
    None
}

/// Rule 2: a committed machine of the current wave that turned unhealthy.
fn bake_failure(rollout: &Rollout, view: &MachineView, now: UnixSeconds) -> Option<Action> {
    let record = &view.record;
    if record.state != MachineRolloutState::Committed || record.wave != rollout.current_wave {
        return None;
    }
    let committed_at = record.committed_at.unwrap_or(now);
    let turned_after_commit = view.live.health_since > committed_at;
    let settled = now >= committed_at.saturating_add(HEALTH_SETTLE_SECONDS);
    (is_unhealthy(view.live.health) && (turned_after_commit || settled)).then(|| Action::Fail {
        machine: record.machine_id,
        reason: format!(
            "turned {} during bake after committing {}",
            view.live.health,
            rollout.image.reference()
        ),
    })
}

/// Machines by wave, for the wave rules.
fn wave_members(machines: &[MachineView], wave: u32) -> Vec<&MachineView> {
    machines
        .iter()
        .filter(|view| view.record.wave == wave)
        .collect()
}

fn is_final_forward(state: MachineRolloutState) -> bool {
    matches!(
        state,
        MachineRolloutState::Committed | MachineRolloutState::Failed
    )
}

/// When the last machine of `members` finished, if all have.
fn wave_done_at(members: &[&MachineView]) -> Option<UnixSeconds> {
    if members
        .iter()
        .all(|view| is_final_forward(view.record.state))
    {
        Some(
            members
                .iter()
                .filter_map(|view| view.record.finished_at.or(view.record.committed_at))
                .max()
                .unwrap_or(0),
        )
    } else {
        None
    }
}

/// What a rollout is waiting for now, for people (`rollout show`).
pub fn waiting_for(rollout: &Rollout, machines: &[MachineView], now: UnixSeconds) -> String {
    if rollout.state != RolloutState::Running {
        return String::new();
    }
    let wave = rollout.current_wave;
    let stage_name = |stage: u32| {
        rollout
            .plan
            .stages
            .get(stage as usize)
            .map(|stage| stage.name.clone())
            .unwrap_or_default()
    };
    let Some(stage) = rollout.stage_of_wave(wave) else {
        return String::new();
    };
    if rollout.wave_started_at.is_none() {
        return format!("start of wave {}", wave + 1);
    }
    let members = wave_members(machines, wave);
    match wave_done_at(&members) {
        None => {
            let waiting = members
                .iter()
                .filter(|view| view.record.state == MachineRolloutState::Pending)
                .filter(|view| !may_be_swapped(view))
                .count();
            if waiting > 0 {
                format!(
                    "{waiting} machine(s) of wave {} to be operational",
                    wave + 1
                )
            } else {
                format!("wave {} to commit", wave + 1)
            }
        }
        Some(done_at) => {
            let bake = rollout.plan.stages[stage as usize].bake_seconds;
            let until = done_at.saturating_add(i64::try_from(bake).unwrap_or(i64::MAX));
            if now < until {
                format!("bake of wave {} ({} s left)", wave + 1, until - now)
            } else if needs_approval(rollout, wave) {
                format!("approval of stage {} (rollout approve)", stage_name(stage))
            } else {
                format!("health of wave {}", wave + 1)
            }
        }
    }
}

/// Whether `wave` closes a stage whose approval gate is still shut: the
/// rollout waits after it (baked and healthy) for `rollout approve`.
fn needs_approval(rollout: &Rollout, wave: u32) -> bool {
    let Some(stage) = rollout.stage_of_wave(wave) else {
        return false;
    };
    let closes_stage = rollout.stage_of_wave(wave + 1) != Some(stage);
    closes_stage
        && rollout
            .plan
            .stages
            .get(stage as usize)
            .is_some_and(|definition| definition.approval)
        && !rollout.approved_stages.contains(&stage)
}

/// The decisions for `rollout` at `now`. An empty answer means: nothing to do
/// until something changes (a report, a health transition, a command, time).
///
/// Live facts are read only for the machines of the current wave and those
/// in flight (every machine while rolling back); the runner may leave the
/// others' `live` empty, so no rule may depend on them.
pub fn next(rollout: &Rollout, machines: &[MachineView], now: UnixSeconds) -> Vec<Action> {
    match rollout.state {
        RolloutState::Pending => vec![Action::SetState {
            state: RolloutState::Running,
            reason: "started".to_owned(),
        }],
        RolloutState::Running => next_running(rollout, machines, now),
        // Paused: only follow what agents already told to swap report; no
        // deadlines, no new sends, no new waves.
        RolloutState::Paused => machines
            .iter()
            .filter_map(|view| observe_forward(rollout, view, now, false))
            .collect(),
        RolloutState::RollingBack => next_rolling_back(rollout, machines, now),
        _ => Vec::new(),
    }
}

fn next_running(rollout: &Rollout, machines: &[MachineView], now: UnixSeconds) -> Vec<Action> {
    let mut actions: Vec<Action> = Vec::new();
    // Rules 1 and 2.
    let mut failed_now: BTreeMap<Uuid, ()> = BTreeMap::new();
    for view in machines {
        let decided =
            observe_forward(rollout, view, now, true).or_else(|| bake_failure(rollout, view, now));
        if let Some(action) = decided {
            if let Action::Fail { machine, .. } = &action {
                failed_now.insert(*machine, ());
            }
            actions.push(action);
        }
    }
    // Rule 3.
    let failures = machines
        .iter()
        .filter(|view| {
            view.record.state == MachineRolloutState::Failed
                || failed_now.contains_key(&view.record.machine_id)
        })
        .count();
    let threshold = failure_threshold(rollout, machines.len());
    if failures >= threshold {
        let reason = format!(
            "{failures} machine(s) failed (max_failures {} = {threshold})",
            rollout.plan.policy.max_failures
        );
        let state = match rollout.plan.policy.on_failure {
            OnFailure::Rollback => RolloutState::RollingBack,
            OnFailure::Halt => RolloutState::Failed,
        };
        actions.push(Action::SetState { state, reason });
        return actions;
    }
    // Machine actions first: the wave rules below must see them applied.
    if !actions.is_empty() {
        return actions;
    }
    // Rule 4.
    let wave = rollout.current_wave;
    let Some(stage) = rollout.stage_of_wave(wave) else {
        return vec![Action::SetState {
            state: RolloutState::Succeeded,
            reason: "no waves".to_owned(),
        }];
    };
    if rollout.wave_started_at.is_none() {
        return vec![Action::StartWave { wave }];
    }
    let members = wave_members(machines, wave);
    for view in &members {
        if view.record.state != MachineRolloutState::Pending {
            continue;
        }
        let machine = view.record.machine_id;
        if view.live.current_digest.as_deref() == Some(rollout.image.digest.as_str())
            && !swap_in_progress(view)
        {
            // Already runs the image (set by hand, or a swap finished while
            // the server was down): nothing to send.
            actions.push(Action::Commit { machine });
        } else if may_be_swapped(view) {
            actions.push(Action::Send { machine });
        }
    }
    if !actions.is_empty() {
        return actions;
    }
    let Some(done_at) = wave_done_at(&members) else {
        return Vec::new();
    };
    let bake = i64::try_from(rollout.plan.stages[stage as usize].bake_seconds).unwrap_or(i64::MAX);
    if now < done_at.saturating_add(bake) {
        return Vec::new();
    }
    let all_healthy = members.iter().all(|view| {
        view.record.state != MachineRolloutState::Committed
            || view.live.health == MachineState::Operational
    });
    if !all_healthy || needs_approval(rollout, wave) {
        // Rule 2 fails them once they are proven unhealthy; an approval
        // gate waits for `rollout approve`.
        return Vec::new();
    }
    if wave + 1 < rollout.wave_count() {
        // The next wave starts in the following pass, unless its stage's
        // approval gate is closed.
        return vec![Action::AdvanceTo { wave: wave + 1 }];
    }
    let committed = machines
        .iter()
        .filter(|view| view.record.state == MachineRolloutState::Committed)
        .count();
    vec![Action::SetState {
        state: RolloutState::Succeeded,
        reason: format!(
            "{committed} of {} machines run {} ({failures} failed)",
            machines.len(),
            rollout.image.reference()
        ),
    }]
}

fn next_rolling_back(rollout: &Rollout, machines: &[MachineView], now: UnixSeconds) -> Vec<Action> {
    let digest = rollout.image.digest.as_str();
    let mut actions = Vec::new();
    let mut to_revert: Vec<&MachineView> = Vec::new();
    let mut busy = false;
    for view in machines {
        let record = &view.record;
        let machine = record.machine_id;
        let runs_new = view.live.current_digest.as_deref() == Some(digest);
        let took_new = record.state.is_in_flight()
            || record.state == MachineRolloutState::Committed
            || (record.state == MachineRolloutState::Failed && runs_new);
        if took_new {
            match &record.previous_image {
                Some(_) => to_revert.push(view),
                None if record.state != MachineRolloutState::Failed => {
                    actions.push(Action::Fail {
                        machine,
                        reason: "no previous image to roll back to".to_owned(),
                    });
                }
                None => {}
            }
            continue;
        }
        if record.state != MachineRolloutState::RollingBack {
            continue;
        }
        busy = true;
        let Some(previous) = &record.previous_image else {
            continue;
        };
        if view.live.current_digest.as_deref() == Some(previous.digest.as_str())
            && !swap_in_progress(view)
        {
            actions.push(Action::RolledBack { machine });
        } else if let Some(swap) = swap_towards(view, &previous.digest, record.sent_at)
            .filter(|swap| swap.outcome == "failed")
        {
            actions.push(Action::Fail {
                machine,
                reason: format!("rollback failed at {}: {}", swap.step, swap.message),
            });
        } else if deadline_passed(rollout, record.sent_at, now) {
            actions.push(Action::Fail {
                machine,
                reason: format!(
                    "not back on {}@{} within machine_deadline ({} s)",
                    previous.name, previous.version, rollout.plan.policy.machine_deadline_seconds
                ),
            });
        }
    }
    // Newest waves first: the machines updated last are the least proven.
    to_revert.sort_by(|a, b| {
        (b.record.wave, &a.record.hostname).cmp(&(a.record.wave, &b.record.hostname))
    });
    actions.extend(to_revert.into_iter().map(|view| Action::SendRollback {
        machine: view.record.machine_id,
    }));
    if actions.is_empty() && !busy {
        let reverted = machines
            .iter()
            .filter(|view| view.record.state == MachineRolloutState::RolledBack)
            .count();
        let failed = machines
            .iter()
            .filter(|view| view.record.state == MachineRolloutState::Failed)
            .count();
        return vec![Action::SetState {
            state: RolloutState::RolledBack,
            reason: format!("{reverted} machine(s) back on their previous image ({failed} failed)"),
        }];
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::rollout::plan::parse_plan;
    use crate::domain::rollout::waves::{assign_waves, wave_stages, Candidate};
    use crate::domain::rollout::{
        pending_machine_for_tests, LiveMachine, RolloutImage, RolloutMachine, SwapView,
    };

    const PLAN: &str = r#"
[[stage]]
name = "qualification"
selector = "env=qa"
bake = "60s"

[[stage]]
name = "canary"
selector = "env=prod"
batch = 1
bake = "60s"

[[stage]]
name = "waves"
selector = "env=prod"
batch = 2
max_unavailable_per_zone = 1

[policy]
max_failures = 2
machine_deadline = "300s"
on_failure = "rollback"
"#;

    const NEW: &str = "new-digest";
    const OLD: &str = "old-digest";
    const T0: i64 = 1_000_000;

    /// q1 (qa, dc1); p1 dc1, p2 dc2, p3 dc3, p4 dc1, p5 dc2 (prod).
    /// Waves: 0 = [q1], 1 = [p1] (canary), 2 = [p4, p2], 3 = [p5, p3].
    const FLEET: [(&str, &str, &str); 6] = [
        ("q1", "dc1", "env=qa"),
        ("p1", "dc1", "env=prod"),
        ("p2", "dc2", "env=prod"),
        ("p3", "dc3", "env=prod"),
        ("p4", "dc1", "env=prod"),
        ("p5", "dc2", "env=prod"),
    ];

    fn id(name: &str) -> Uuid {
        let index = FLEET.iter().position(|(n, _, _)| *n == name).unwrap();
        Uuid::from_u128(index as u128 + 1)
    }

    fn name(machine: Uuid) -> &'static str {
        FLEET[machine.as_u128() as usize - 1].0
    }

    #[derive(Clone)]
    struct Fixture {
        rollout: Rollout,
        views: Vec<MachineView>,
    }

    fn fixture(plan: &str) -> Fixture {
        let plan = parse_plan(plan).unwrap();
        let candidates: Vec<Candidate> = FLEET
            .iter()
            .map(|(hostname, zone, labels)| Candidate {
                id: id(hostname),
                hostname: (*hostname).to_owned(),
                zone: (*zone).to_owned(),
                labels: flotte_proto::labels::parse_labels(labels).unwrap(),
            })
            .collect();
        let assignments = assign_waves(&plan, &candidates);
        let rollout_id = Uuid::from_u128(999);
        let views = assignments
            .iter()
            .map(|assignment| MachineView {
                record: RolloutMachine {
                    zone: assignment.zone.clone(),
                    stage: assignment.stage,
                    ..pending_machine_for_tests(
                        rollout_id,
                        assignment.machine,
                        &assignment.hostname,
                        assignment.wave,
                        OLD,
                    )
                },
                live: LiveMachine {
                    connected: true,
                    health: MachineState::Operational,
                    health_since: T0 - 1000,
                    current_digest: Some(OLD.into()),
                    swap: None,
                    quarantined: false,
                },
            })
            .collect();
        Fixture {
            rollout: Rollout {
                id: rollout_id,
                image: RolloutImage {
                    name: "app".into(),
                    version: "2.0.0".into(),
                    digest: NEW.into(),
                },
                plan,
                plan_toml: String::new(),
                state: RolloutState::Running,
                reason: String::new(),
                created_at: T0,
                created_by: "alice".into(),
                updated_at: T0,
                wave_stages: wave_stages(&assignments),
                current_wave: 0,
                wave_started_at: None,
                approved_stages: Vec::new(),
                revision: 0,
            },
            views,
        }
    }

    impl Fixture {
        fn view(&mut self, machine: &str) -> &mut MachineView {
            self.views
                .iter_mut()
                .find(|view| view.record.hostname == machine)
                .unwrap()
        }

        fn start(mut self, wave: u32, at: i64) -> Self {
            for earlier in 0..wave {
                let names: Vec<String> = self
                    .views
                    .iter()
                    .filter(|view| view.record.wave == earlier)
                    .map(|view| view.record.hostname.clone())
                    .collect();
                for machine in names {
                    self = self.committed(&machine, at - 100);
                }
            }
            self.rollout.current_wave = wave;
            self.rollout.wave_started_at = Some(at);
            for view in &mut self.views {
                if view.record.wave == wave {
                    view.record.turn_at = Some(at);
                }
            }
            self
        }

        fn sent(mut self, machine: &str, at: i64) -> Self {
            let view = self.view(machine);
            view.record.state = MachineRolloutState::Sent;
            view.record.sent_at = Some(at);
            self
        }

        fn committed(mut self, machine: &str, at: i64) -> Self {
            let view = self.view(machine);
            view.record.state = MachineRolloutState::Committed;
            view.record.sent_at.get_or_insert(at);
            view.record.committed_at = Some(at);
            view.record.finished_at = Some(at);
            view.live.current_digest = Some(NEW.into());
            self
        }

        fn failed(mut self, machine: &str, at: i64) -> Self {
            let view = self.view(machine);
            view.record.state = MachineRolloutState::Failed;
            view.record.finished_at = Some(at);
            self
        }

        fn swap(mut self, machine: &str, step: &str, outcome: &str, at: i64) -> Self {
            self.view(machine).live.swap = Some(SwapView {
                target_digest: NEW.into(),
                step: step.into(),
                outcome: outcome.into(),
                message: format!("{step} said {outcome}"),
                updated_at: at,
            });
            self
        }

        fn health(mut self, machine: &str, state: MachineState, since: i64) -> Self {
            let view = self.view(machine);
            view.live.health = state;
            view.live.health_since = since;
            self
        }

        fn with(mut self, change: impl FnOnce(&mut Self)) -> Self {
            change(&mut self);
            self
        }
    }

    fn render(action: &Action) -> String {
        match action {
            Action::SetState { state, reason } => format!("state {state}: {reason}"),
            Action::AdvanceTo { wave } => format!("advance {wave}"),
            Action::StartWave { wave } => format!("start {wave}"),
            Action::Send { machine } => format!("send {}", name(*machine)),
            Action::Progress { machine, state } => format!("progress {} {state}", name(*machine)),
            Action::Commit { machine } => format!("commit {}", name(*machine)),
            Action::Fail { machine, reason } => format!("fail {}: {reason}", name(*machine)),
            Action::SendRollback { machine } => format!("rollback {}", name(*machine)),
            Action::RolledBack { machine } => format!("rolled back {}", name(*machine)),
        }
    }

    #[test]
    fn decisions_table() {
        let base = || fixture(PLAN);
        let with_approval =
            || fixture(&PLAN.replace("batch = 1\n", "batch = 1\napproval = true\n"));
        let halting =
            || fixture(&PLAN.replace("on_failure = \"rollback\"", "on_failure = \"halt\""));
        let percent = || fixture(&PLAN.replace("max_failures = 2", "max_failures = \"50%\""));
        let now = T0 + 10;
        // (name, fixture, now, expected actions: each a prefix of the rendering)
        let cases: Vec<(&str, Fixture, i64, Vec<&str>)> = vec![
            (
                "a pending rollout starts",
                base().with(|f| f.rollout.state = RolloutState::Pending),
                now,
                vec!["state running"],
            ),
            ("the first wave starts", base(), now, vec!["start 0"]),
            (
                "an operational machine is sent its image when its wave starts",
                base().start(0, T0),
                now,
                vec!["send q1"],
            ),
            (
                "a disconnected machine is waited for",
                base()
                    .start(0, T0)
                    .with(|f| f.view("q1").live.connected = false),
                now,
                vec![],
            ),
            (
                "a degraded machine is not swapped",
                base()
                    .start(0, T0)
                    .health("q1", MachineState::Degraded, T0 - 5),
                now,
                vec![],
            ),
            (
                "a quarantined machine is not swapped",
                base()
                    .start(0, T0)
                    .with(|f| f.view("q1").live.quarantined = true),
                now,
                vec![],
            ),
            (
                "an offline machine fails at its deadline",
                base()
                    .start(0, T0)
                    .with(|f| f.view("q1").live.connected = false)
                    .health("q1", MachineState::Unreachable, T0 - 5),
                T0 + 300,
                vec!["fail q1: never operational and connected within machine_deadline (300 s)"],
            ),
            (
                "agent progress is recorded",
                base().start(0, T0).sent("q1", T0).swap("q1", "unpacking", "in_progress", T0 + 1),
                now,
                vec!["progress q1 downloading"],
            ),
            (
                "a restart counts as switching",
                base().start(0, T0).sent("q1", T0).swap("q1", "restarting", "in_progress", T0 + 2),
                now,
                vec!["progress q1 switching"],
            ),
            (
                "a committed swap commits the machine",
                base()
                    .start(0, T0)
                    .sent("q1", T0)
                    .swap("q1", "committed", "committed", T0 + 3)
                    .with(|f| f.view("q1").live.current_digest = Some(NEW.into())),
                now,
                vec!["commit q1"],
            ),
            (
                "a failed swap fails the machine",
                base().start(0, T0).sent("q1", T0).swap("q1", "rolled_back", "failed", T0 + 3),
                now,
                vec!["fail q1: swap failed at rolled_back"],
            ),
            (
                "a failure older than the send is an earlier attempt's",
                base().start(0, T0).sent("q1", T0).swap("q1", "rolled_back", "failed", T0 - 50),
                now,
                vec![],
            ),
            (
                "a stuck machine fails at its deadline",
                base().start(0, T0).sent("q1", T0).swap("q1", "verifying", "in_progress", T0 + 5)
                    .with(|f| f.view("q1").record.state = MachineRolloutState::Verifying),
                T0 + 301,
                vec!["fail q1: not committed within machine_deadline (300 s); last state verifying"],
            ),
            (
                "the bake time holds the next wave",
                base().start(0, T0).committed("q1", T0 + 5),
                T0 + 64,
                vec![],
            ),
            (
                "after the bake the next wave comes",
                base().start(0, T0).committed("q1", T0 + 5),
                T0 + 65,
                vec!["advance 1"],
            ),
            (
                "a machine turning unhealthy during bake fails",
                base()
                    .start(0, T0)
                    .committed("q1", T0 + 5)
                    .health("q1", MachineState::Down, T0 + 20),
                T0 + 21,
                vec!["fail q1: turned down during bake"],
            ),
            (
                "a stale unhealthy state gets time to settle",
                base()
                    .start(0, T0)
                    .committed("q1", T0 + 5)
                    .health("q1", MachineState::Down, T0 + 2),
                T0 + 8,
                vec![],
            ),
            (
                "an unhealthy state that does not settle fails",
                base()
                    .start(0, T0)
                    .committed("q1", T0 + 5)
                    .health("q1", MachineState::Down, T0 + 2),
                T0 + 5 + HEALTH_SETTLE_SECONDS,
                vec!["fail q1: turned down"],
            ),
            (
                "a stage with approval waits for it once done and baked",
                with_approval().start(1, T0).committed("p1", T0 + 5),
                T0 + 65,
                vec![],
            ),
            (
                "an approved stage goes on",
                with_approval()
                    .start(1, T0)
                    .committed("p1", T0 + 5)
                    .with(|f| f.rollout.approved_stages = vec![1]),
                T0 + 65,
                vec!["advance 2"],
            ),
            (
                "a new wave starts at once",
                base().start(0, T0).committed("q1", T0 + 5).with(|f| {
                    f.rollout.current_wave = 1;
                    f.rollout.wave_started_at = None;
                }),
                T0 + 65,
                vec!["start 1"],
            ),
            (
                "a wave takes one machine per zone and all are sent together",
                base().start(2, T0),
                now,
                vec!["send p4", "send p2"],
            ),
            (
                "a machine already on the image is committed without a send",
                base().start(1, T0).with(|f| f.view("p1").live.current_digest = Some(NEW.into())),
                now,
                vec!["commit p1"],
            ),
            (
                "one failure below max_failures = 2 goes on",
                base().start(2, T0).failed("p4", T0 + 1).sent("p2", T0),
                now,
                vec![],
            ),
            (
                "reaching max_failures starts the rollback",
                base().start(2, T0).failed("p4", T0 + 1).sent("p2", T0).swap("p2", "rolled_back", "failed", T0 + 2),
                now,
                vec!["fail p2", "state rolling_back: 2 machine(s) failed (max_failures 2 = 2)"],
            ),
            (
                "on_failure = halt fails the rollout where it is",
                halting().start(2, T0).failed("p4", T0 + 1).failed("p2", T0 + 1),
                now,
                vec!["state failed: 2 machine(s) failed"],
            ),
            (
                "max_failures = 50% of 6 allows two failures",
                percent().start(2, T0).failed("p4", T0 + 1).failed("p2", T0 + 1),
                now,
                vec!["advance 3"],
            ),
            (
                "max_failures = 50% of 6 halts at the third",
                percent().start(3, T0).failed("p4", T0 + 1).failed("p2", T0 + 1).failed("p5", T0 + 2),
                now,
                vec!["state rolling_back: 3 machine(s) failed (max_failures 50% = 3)"],
            ),
            (
                "the last wave done, the rollout succeeds",
                base().start(3, T0).committed("p5", T0 + 1).committed("p3", T0 + 2),
                now,
                vec!["state succeeded: 6 of 6 machines run app@2.0.0 (0 failed)"],
            ),
            (
                "paused: in-flight machines are followed, nothing is sent",
                base()
                    .start(2, T0)
                    .sent("p4", T0)
                    .swap("p4", "committed", "committed", T0 + 1)
                    .with(|f| {
                        f.view("p4").live.current_digest = Some(NEW.into());
                        f.rollout.state = RolloutState::Paused;
                    }),
                now,
                vec!["commit p4"],
            ),
            (
                "paused: no deadline fails a machine",
                base().start(2, T0).sent("p4", T0).with(|f| f.rollout.state = RolloutState::Paused),
                T0 + 10_000,
                vec![],
            ),
            (
                "rollback reverts updated machines, newest wave first",
                base().start(2, T0).committed("p4", T0 + 1).sent("p2", T0).with(|f| {
                    f.rollout.state = RolloutState::RollingBack;
                }),
                now,
                vec!["rollback p2", "rollback p4", "rollback p1", "rollback q1"],
            ),
            (
                "a failed machine still on the new image is reverted, one the agent reverted is not",
                base()
                    .start(1, T0)
                    .failed("p1", T0 + 1)
                    .with(|f| {
                        f.view("p1").live.current_digest = Some(NEW.into());
                        f.view("q1").record.state = MachineRolloutState::Failed;
                        f.view("q1").live.current_digest = Some(OLD.into());
                        f.rollout.state = RolloutState::RollingBack;
                    }),
                now,
                vec!["rollback p1"],
            ),
            (
                "a machine back on its previous image is rolled back",
                base().start(1, T0).with(|f| {
                    for machine in ["q1", "p1"] {
                        let view = f.view(machine);
                        view.record.state = MachineRolloutState::RollingBack;
                        view.record.sent_at = Some(T0 + 5);
                        view.live.current_digest = Some(OLD.into());
                    }
                    f.view("p1").live.current_digest = Some(NEW.into());
                    f.rollout.state = RolloutState::RollingBack;
                }),
                now,
                vec!["rolled back q1"],
            ),
            (
                "when every updated machine is back, the rollout is rolled back",
                base().with(|f| {
                    f.view("q1").record.state = MachineRolloutState::RolledBack;
                    f.rollout.state = RolloutState::RollingBack;
                }),
                now,
                vec!["state rolled_back: 1 machine(s) back on their previous image (0 failed)"],
            ),
            (
                "a machine with no previous image cannot be reverted",
                base().start(1, T0).with(|f| {
                    f.view("q1").record.previous_image = None;
                    f.view("p1").record.state = MachineRolloutState::RolledBack;
                    f.rollout.state = RolloutState::RollingBack;
                }),
                now,
                vec!["fail q1: no previous image to roll back to"],
            ),
            (
                "a finished rollout does nothing",
                base().with(|f| f.rollout.state = RolloutState::Aborted),
                now,
                vec![],
            ),
        ];
        assert!(cases.len() >= 20);
        for (case, fixture, now, expected) in cases {
            let actions: Vec<String> = next(&fixture.rollout, &fixture.views, now)
                .iter()
                .map(render)
                .collect();
            assert_eq!(
                actions.len(),
                expected.len(),
                "{case}: got {actions:#?}, expected {expected:#?}"
            );
            for (got, wanted) in actions.iter().zip(&expected) {
                assert!(
                    got.starts_with(wanted),
                    "{case}: got {got:?}, expected {wanted:?}"
                );
            }
        }
    }

    #[test]
    fn commands_table() {
        use RolloutState::*;
        let with_approval = fixture(&PLAN.replace("batch = 1\n", "batch = 1\napproval = true\n"));
        let cases = [
            (Running, Command::Pause, Ok(CommandEffect::State(Paused))),
            (Paused, Command::Resume, Ok(CommandEffect::State(Running))),
            (Running, Command::Resume, Err("cannot resume")),
            (
                RollingBack,
                Command::Abort,
                Ok(CommandEffect::State(Aborted)),
            ),
            (Succeeded, Command::Abort, Err("cannot abort")),
            (
                Succeeded,
                Command::Rollback,
                Ok(CommandEffect::State(RollingBack)),
            ),
            (RolledBack, Command::Rollback, Err("cannot rollback")),
            (
                Running,
                Command::Approve,
                Ok(CommandEffect::ApproveStage(1)),
            ),
        ];
        for (state, command, expected) in cases {
            let mut rollout = with_approval.rollout.clone();
            rollout.state = state;
            let got = apply_command(&rollout, &command);
            match (&got, expected) {
                (Ok(effect), Ok(wanted)) => assert_eq!(effect, &wanted, "{state} {command:?}"),
                (Err(message), Err(wanted)) => assert!(message.contains(wanted), "{message}"),
                _ => panic!("{state} {command:?}: {got:?}"),
            }
        }
        let mut approved = with_approval.rollout.clone();
        approved.approved_stages = vec![1];
        assert!(apply_command(&approved, &Command::Approve)
            .unwrap_err()
            .contains("no stage waiting for approval"));
    }
}
