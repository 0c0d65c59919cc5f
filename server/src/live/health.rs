//! The in-memory health tracker: each machine's current state and last
//! report. The decisions (the state a report describes, who has been silent
//! too long) are pure functions in `domain::health`; this module applies
//! them under one lock.
//!
//! Only *transitions* leave this module (through an ordered channel to the
//! applier in `transitions`); a report that changes nothing costs a map
//! update and no store write.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::domain::health::{
    silent_machines, state_from_report, HealthReport, ImageStatus, LastHeard, MachineState,
};
use crate::store::{MachineRecord, UnixSeconds};

/// A change of state, as stored and announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub machine_id: Uuid,
    pub at: UnixSeconds,
    pub from: MachineState,
    pub to: MachineState,
    pub reason: String,
}

/// What the tracker knows of one machine.
#[derive(Debug, Clone)]
pub struct TrackedMachine {
    pub hostname: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub state: MachineState,
    pub reason: String,
    pub since: UnixSeconds,
    /// Last report time (server clock); starts at tracker creation for
    /// machines loaded from the store, so silence is measured from then.
    pub last_report_at: UnixSeconds,
    pub last_report: Option<Arc<HealthReport>>,
}

/// In-memory current state of every machine; decisions are made under its
/// lock and transitions are queued in decision order.
#[derive(Debug)]
pub struct HealthTracker {
    machines: Mutex<HashMap<Uuid, TrackedMachine>>,
    transitions: mpsc::UnboundedSender<Transition>,
    grace: Duration,
}

impl HealthTracker {
    /// Starts tracking `machines` (from the store) at `now`; transitions are
    /// sent to `transitions` in the order they are decided.
    pub fn new(
        machines: &[MachineRecord],
        now: UnixSeconds,
        grace: Duration,
        transitions: mpsc::UnboundedSender<Transition>,
    ) -> Self {
        let tracked = machines
            .iter()
            .map(|machine| (machine.id, tracked_from_record(machine, now)))
            .collect();
        HealthTracker {
            machines: Mutex::new(tracked),
            transitions,
            grace,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, TrackedMachine>> {
        // Every critical section is a single consistent update.
        self.machines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn transition(
        &self,
        machine_id: Uuid,
        machine: &mut TrackedMachine,
        to: MachineState,
        reason: String,
        now: UnixSeconds,
    ) {
        let transition = change_state(machine_id, machine, to, reason, now);
        // The receiver lives as long as the server; if it is gone we are shutting down.
        let _ = self.transitions.send(transition);
    }

    /// Adds or refreshes a machine's identity facts (enrollment, hello, relabel).
    pub fn upsert(&self, machine: &MachineRecord, now: UnixSeconds) {
        let mut machines = self.lock();
        let entry = machines
            .entry(machine.id)
            .or_insert_with(|| tracked_from_record(machine, now));
        entry.hostname = machine.inventory.hostname.clone();
        entry.zone = machine.zone.clone();
        entry.labels = machine.labels.clone();
    }

    /// Records a report; a change of state becomes a transition. Returns
    /// the image status if it changed since the last report (for the other
    /// replicas, whose rollout engine may be the one waiting for it).
    pub fn observe_report(
        &self,
        machine_id: Uuid,
        report: HealthReport,
        now: UnixSeconds,
    ) -> Option<ImageStatus> {
        let (state, reason) = state_from_report(&report);
        let mut machines = self.lock();
        let machine = machines.get_mut(&machine_id)?;
        if machine.state == MachineState::Retired {
            return None;
        }
        let previous_image = machine
            .last_report
            .as_ref()
            .and_then(|previous| previous.image.as_ref());
        let image_changed = report.image.as_ref().filter(|image| {
            previous_image.is_none_or(|previous| !same_image_progress(previous, image))
        });
        let changed_image = image_changed.cloned();
        machine.last_report_at = now;
        machine.last_report = Some(Arc::new(report));
        if machine.state != state {
            self.transition(machine_id, machine, state, reason, now);
        } else {
            // Same state, fresher words (e.g. which disk is full now).
            machine.reason = reason;
        }
        changed_image
    }

    /// Takes a machine's image status reported to another replica (the one
    /// holding its session), keeping the rest of what is known here.
    pub fn adopt_image(&self, machine_id: Uuid, image: ImageStatus) {
        let mut machines = self.lock();
        let Some(machine) = machines.get_mut(&machine_id) else {
            return;
        };
        let mut report = machine.last_report.as_deref().cloned().unwrap_or_default();
        report.image = Some(image);
        machine.last_report = Some(Arc::new(report));
    }

    /// Marks machines silent for longer than the grace period unreachable,
    /// among those `judged_here` says this replica judges. The others are
    /// heard of through the replica holding their session, so their silence
    /// is counted from now: if that replica dies, they become unreachable
    /// only after a whole grace period.
    pub fn check_liveness(&self, now: UnixSeconds, judged_here: &dyn Fn(Uuid) -> bool) {
        let mut machines = self.lock();
        for (machine_id, machine) in machines.iter_mut() {
            if !judged_here(*machine_id) {
                machine.last_report_at = now;
            }
        }
        let last_heard = machines.iter().map(|(machine_id, machine)| LastHeard {
            machine_id: *machine_id,
            state: machine.state,
            last_report_at: machine.last_report_at,
        });
        for machine_id in silent_machines(last_heard, now, self.grace) {
            if let Some(machine) = machines.get_mut(&machine_id) {
                let silence = now.saturating_sub(machine.last_report_at);
                let reason = format!(
                    "no report for {silence} s (grace {} s)",
                    self.grace.as_secs()
                );
                self.transition(machine_id, machine, MachineState::Unreachable, reason, now);
            }
        }
    }

    /// Takes a state decided elsewhere (by the replica holding the
    /// machine's session) without deciding or storing anything. Returns the
    /// change, for local watchers, if the state was not already this one.
    pub fn adopt(
        &self,
        machine_id: Uuid,
        state: MachineState,
        reason: &str,
        at: UnixSeconds,
    ) -> Option<Transition> {
        let mut machines = self.lock();
        let machine = machines.get_mut(&machine_id)?;
        if machine.state == state || machine.state == MachineState::Retired {
            return None;
        }
        Some(change_state(
            machine_id,
            machine,
            state,
            reason.to_owned(),
            at,
        ))
    }

    /// Moves a decommissioned machine to `retired`, for good.
    pub fn retire(&self, machine_id: Uuid, reason: &str, now: UnixSeconds) {
        let mut machines = self.lock();
        if let Some(machine) = machines.get_mut(&machine_id) {
            if machine.state != MachineState::Retired {
                self.transition(
                    machine_id,
                    machine,
                    MachineState::Retired,
                    reason.to_owned(),
                    now,
                );
            }
        }
    }

    pub fn get(&self, machine_id: Uuid) -> Option<TrackedMachine> {
        self.lock().get(&machine_id).cloned()
    }

    /// A copy of every tracked machine (for listings, status and watches).
    pub fn snapshot(&self) -> HashMap<Uuid, TrackedMachine> {
        self.lock().clone()
    }
}

/// Moves `machine` to `to` at `at`; the change, as stored and announced.
fn change_state(
    machine_id: Uuid,
    machine: &mut TrackedMachine,
    to: MachineState,
    reason: String,
    at: UnixSeconds,
) -> Transition {
    let transition = Transition {
        machine_id,
        at,
        from: machine.state,
        to,
        reason: reason.clone(),
    };
    machine.state = to;
    machine.reason = reason;
    machine.since = at;
    transition
}

/// Whether two image statuses say the same about the machine's images and
/// its swap (download progress aside, which changes every report).
/// Compared field by field: this runs on every report, so nothing is cloned.
fn same_image_progress(previous: &ImageStatus, current: &ImageStatus) -> bool {
    let same_swap = match (&previous.swap, &current.swap) {
        (None, None) => true,
        (Some(before), Some(now)) => {
            before.target == now.target
                && before.step == now.step
                && before.outcome == now.outcome
                && before.message == now.message
                && before.updated_at == now.updated_at
                && before.checks == now.checks
        }
        _ => false,
    };
    same_swap && previous.current == current.current && previous.previous == current.previous
}

fn tracked_from_record(machine: &MachineRecord, now: UnixSeconds) -> TrackedMachine {
    TrackedMachine {
        hostname: machine.inventory.hostname.clone(),
        zone: machine.zone.clone(),
        labels: machine.labels.clone(),
        state: MachineState::parse(&machine.state).unwrap_or(MachineState::Unknown),
        reason: machine.state_reason.clone(),
        since: machine.state_since,
        last_report_at: now,
        last_report: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::health::CheckReport;

    fn report_with_web_check(healthy: bool) -> HealthReport {
        HealthReport {
            checks: vec![CheckReport {
                name: "web".into(),
                critical: true,
                healthy,
                last_output: if healthy {
                    String::new()
                } else {
                    "web broke".into()
                },
                ..CheckReport::default()
            }],
            ..HealthReport::default()
        }
    }

    fn record(id: Uuid, state: &str) -> MachineRecord {
        MachineRecord {
            labels: BTreeMap::new(),
            state: state.into(),
            ..crate::store::contract::machine(id, "")
        }
    }

    /// A tracker of one machine stored in `state`, started at `now` with a
    /// 30 s grace, and the receiving end of its transitions.
    fn tracker_of_one(
        state: &str,
        now: UnixSeconds,
    ) -> (HealthTracker, Uuid, mpsc::UnboundedReceiver<Transition>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let id = Uuid::new_v4();
        let tracker =
            HealthTracker::new(&[record(id, state)], now, Duration::from_secs(30), sender);
        (tracker, id, receiver)
    }

    /// The transitions sent so far, as (from, to, at).
    fn drain(
        receiver: &mut mpsc::UnboundedReceiver<Transition>,
    ) -> Vec<(MachineState, MachineState, UnixSeconds)> {
        let mut seen = Vec::new();
        while let Ok(transition) = receiver.try_recv() {
            seen.push((transition.from, transition.to, transition.at));
        }
        seen
    }

    #[test]
    fn only_changes_become_transitions_in_order() {
        let (tracker, id, mut receiver) = tracker_of_one("unknown", 100);
        tracker.observe_report(id, report_with_web_check(true), 101);
        tracker.observe_report(id, report_with_web_check(true), 102);
        tracker.observe_report(id, report_with_web_check(false), 103);
        tracker.observe_report(id, report_with_web_check(true), 104);
        // Silence shorter than the grace period changes nothing; longer does.
        tracker.check_liveness(120, &JUDGED_HERE);
        tracker.check_liveness(135, &JUDGED_HERE);
        tracker.check_liveness(140, &JUDGED_HERE);
        use MachineState::*;
        assert_eq!(
            drain(&mut receiver),
            vec![
                (Unknown, Operational, 101),
                (Operational, Down, 103),
                (Down, Operational, 104),
                (Operational, Unreachable, 135),
            ]
        );
        let tracked = tracker.get(id).unwrap();
        assert_eq!(tracked.state, Unreachable);
        assert_eq!(
            tracked.last_report.as_deref(),
            Some(&report_with_web_check(true))
        );
    }

    #[test]
    fn silence_is_measured_from_start_for_machines_that_never_report() {
        let (tracker, _, mut receiver) = tracker_of_one("operational", 1000);
        tracker.check_liveness(1029, &JUDGED_HERE);
        assert!(drain(&mut receiver).is_empty());
        tracker.check_liveness(1031, &JUDGED_HERE);
        assert_eq!(
            drain(&mut receiver),
            vec![(MachineState::Operational, MachineState::Unreachable, 1031)]
        );
    }

    /// One server judges every machine.
    const JUDGED_HERE: fn(Uuid) -> bool = |_| true;

    #[test]
    fn a_machine_held_by_another_replica_is_not_judged_and_its_silence_starts_when_that_ends() {
        let (tracker, _, mut receiver) = tracker_of_one("operational", 1000);
        // Held elsewhere: no report here for a long time, yet not unreachable.
        tracker.check_liveness(1100, &|_| false);
        assert!(drain(&mut receiver).is_empty());
        // Its holder died at 1100: this replica judges it from then on.
        tracker.check_liveness(1129, &JUDGED_HERE);
        assert!(drain(&mut receiver).is_empty());
        tracker.check_liveness(1131, &JUDGED_HERE);
        assert_eq!(
            drain(&mut receiver),
            vec![(MachineState::Operational, MachineState::Unreachable, 1131)]
        );
    }

    #[test]
    fn a_state_decided_elsewhere_is_adopted_without_a_transition_of_its_own() {
        let (tracker, id, mut receiver) = tracker_of_one("operational", 1000);
        let adopted = tracker.adopt(id, MachineState::Down, "web failing", 1005);
        assert_eq!(
            adopted.map(|change| (change.from, change.to)),
            Some((MachineState::Operational, MachineState::Down))
        );
        assert_eq!(tracker.adopt(id, MachineState::Down, "again", 1006), None);
        assert_eq!(tracker.get(id).unwrap().state, MachineState::Down);
        assert!(drain(&mut receiver).is_empty(), "nothing to store or alert");
        assert_eq!(
            tracker.adopt(Uuid::from_u128(9), MachineState::Down, "", 1),
            None
        );
    }

    #[test]
    fn only_a_change_of_image_or_swap_step_is_news_for_the_other_replicas() {
        use crate::domain::health::{ReportedImage, SwapStatus};
        let downloading = |bytes: u64, step: &str| ImageStatus {
            current: Some(ReportedImage {
                name: "app".into(),
                version: "1.0.0".into(),
                digest: "aa".into(),
            }),
            previous: None,
            swap: Some(SwapStatus {
                step: step.into(),
                bytes_downloaded: bytes,
                ..SwapStatus::default()
            }),
        };
        let cases = [
            (
                downloading(10, "downloading"),
                downloading(20, "downloading"),
                true,
            ),
            (
                downloading(20, "downloading"),
                downloading(20, "verifying"),
                false,
            ),
            (downloading(0, "downloading"), ImageStatus::default(), false),
            (ImageStatus::default(), ImageStatus::default(), true),
        ];
        for (previous, current, same) in cases {
            assert_eq!(
                same_image_progress(&previous, &current),
                same,
                "{previous:?} → {current:?}"
            );
        }
        let (tracker, id, _receiver) = tracker_of_one("operational", 100);
        let mut report = report_with_web_check(true);
        report.image = Some(downloading(10, "downloading"));
        assert!(
            tracker.observe_report(id, report.clone(), 101).is_some(),
            "first image status"
        );
        report.image = Some(downloading(99, "downloading"));
        assert!(
            tracker.observe_report(id, report.clone(), 102).is_none(),
            "progress only"
        );
        report.image = Some(downloading(99, "switching"));
        assert!(
            tracker.observe_report(id, report, 103).is_some(),
            "a new step"
        );
    }

    #[test]
    fn a_retired_machine_ignores_reports_and_silence() {
        let (tracker, id, mut receiver) = tracker_of_one("retired", 1000);
        tracker.observe_report(id, report_with_web_check(false), 1001);
        tracker.check_liveness(2000, &JUDGED_HERE);
        assert!(drain(&mut receiver).is_empty());
        assert!(tracker.get(id).unwrap().last_report.is_none());
    }
}
