//! Machine state on the server: `operational`, `degraded`, `down`,
//! `unreachable` (or `unknown` before the first report), and the
//! administrative `retired` (decommissioned: final), decided by pure
//! functions from the agent's reports and from silence, and the in-memory
//! tracker that remembers each machine's current state and last report.
//!
//! Only *transitions* leave this module (through an ordered channel to the
//! applier in `transitions`); a report that changes nothing costs a map
//! update and no store write.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotte_proto::v1::Report;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::store::{MachineRecord, UnixSeconds};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MachineState {
    Unknown,
    Operational,
    Degraded,
    Down,
    Unreachable,
    /// Decommissioned: final, never left, never reported on again.
    Retired,
}

impl MachineState {
    pub const ALL: [MachineState; 6] = [
        MachineState::Operational,
        MachineState::Degraded,
        MachineState::Down,
        MachineState::Unreachable,
        MachineState::Unknown,
        MachineState::Retired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Unknown => "unknown",
            MachineState::Operational => "operational",
            MachineState::Degraded => "degraded",
            MachineState::Down => "down",
            MachineState::Unreachable => "unreachable",
            MachineState::Retired => "retired",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        MachineState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of state, as stored and announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub machine_id: Uuid,
    pub at: UnixSeconds,
    pub from: MachineState,
    pub to: MachineState,
    pub reason: String,
}

fn first_line(text: &str) -> &str {
    let line = text
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("");
    line.char_indices()
        .nth(120)
        .map_or(line, |(index, _)| &line[..index])
}

/// The state a report describes, with a reason naming what is wrong.
///
/// A failing critical check makes the machine `down`; a failing non-critical
/// check or an exceeded metric threshold makes it `degraded`.
pub fn state_from_report(report: &Report) -> (MachineState, String) {
    let failing = |critical: bool| {
        report
            .checks
            .iter()
            .filter(move |check| check.critical == critical && !check.healthy)
            .map(|check| format!("{} failing: {}", check.name, first_line(&check.last_output)))
            .collect::<Vec<_>>()
    };
    let critical = failing(true);
    if !critical.is_empty() {
        return (
            MachineState::Down,
            format!("critical check {}", critical.join("; ")),
        );
    }
    let mut problems: Vec<String> = failing(false)
        .into_iter()
        .map(|problem| format!("check {problem}"))
        .collect();
    problems.extend(report.metric_breaches.iter().cloned());
    if problems.is_empty() {
        let reason = if report.checks.is_empty() {
            "reporting; no checks configured".to_owned()
        } else {
            format!("all {} checks pass", report.checks.len())
        };
        (MachineState::Operational, reason)
    } else {
        (MachineState::Degraded, problems.join("; "))
    }
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
    pub last_report: Option<Arc<Report>>,
}

/// Which tracked machines have been silent longer than `grace` at `now`.
pub fn silent_machines(
    machines: &HashMap<Uuid, TrackedMachine>,
    now: UnixSeconds,
    grace: Duration,
) -> Vec<Uuid> {
    let grace = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    let mut silent: Vec<Uuid> = machines
        .iter()
        .filter(|(_, machine)| {
            !matches!(
                machine.state,
                MachineState::Unreachable | MachineState::Retired
            ) && now.saturating_sub(machine.last_report_at) > grace
        })
        .map(|(id, _)| *id)
        .collect();
    silent.sort();
    silent
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
        let transition = Transition {
            machine_id,
            at: now,
            from: machine.state,
            to,
            reason: reason.clone(),
        };
        machine.state = to;
        machine.reason = reason;
        machine.since = now;
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

    /// Records a report; a change of state becomes a transition.
    pub fn observe_report(&self, machine_id: Uuid, report: Report, now: UnixSeconds) {
        let (state, reason) = state_from_report(&report);
        let mut machines = self.lock();
        let Some(machine) = machines.get_mut(&machine_id) else {
            return;
        };
        if machine.state == MachineState::Retired {
            return;
        }
        machine.last_report_at = now;
        machine.last_report = Some(Arc::new(report));
        if machine.state != state {
            self.transition(machine_id, machine, state, reason, now);
        } else {
            // Same state, fresher words (e.g. which disk is full now).
            machine.reason = reason;
        }
    }

    /// Marks machines silent for longer than the grace period unreachable.
    pub fn check_liveness(&self, now: UnixSeconds) {
        let mut machines = self.lock();
        for machine_id in silent_machines(&machines, now, self.grace) {
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
    use flotte_proto::v1::CheckResult;

    fn check(name: &str, critical: bool, healthy: bool) -> CheckResult {
        CheckResult {
            name: name.into(),
            critical,
            healthy,
            last_output: if healthy {
                String::new()
            } else {
                format!("\n{name} broke\nmore")
            },
            ..CheckResult::default()
        }
    }

    #[test]
    fn reports_map_to_states_with_reasons() {
        let cases = [
            (
                vec![],
                vec![],
                MachineState::Operational,
                "no checks configured",
            ),
            (
                vec![check("web", true, true)],
                vec![],
                MachineState::Operational,
                "all 1 checks pass",
            ),
            (
                vec![check("web", true, false)],
                vec![],
                MachineState::Down,
                "critical check web failing: web broke",
            ),
            (
                vec![check("cache", false, false)],
                vec![],
                MachineState::Degraded,
                "check cache failing: cache broke",
            ),
            (
                vec![],
                vec!["disk /: 95.0% used (max 90%)".to_owned()],
                MachineState::Degraded,
                "disk /: 95.0% used",
            ),
            (
                vec![check("web", true, false), check("cache", false, false)],
                vec!["load: 9 (max 8)".to_owned()],
                MachineState::Down,
                "critical check web failing",
            ),
        ];
        for (checks, breaches, expected_state, expected_reason) in cases {
            let report = Report {
                checks,
                metric_breaches: breaches,
                ..Report::default()
            };
            let (state, reason) = state_from_report(&report);
            assert_eq!(state, expected_state, "{reason}");
            assert!(
                reason.contains(expected_reason),
                "{reason:?} lacks {expected_reason:?}"
            );
        }
    }

    fn record(id: Uuid, state: &str) -> MachineRecord {
        MachineRecord {
            id,
            labels: BTreeMap::new(),
            zone: "dc1".into(),
            enrolled_at: 0,
            enrolled_with_token: String::new(),
            certificate_serial: String::new(),
            previous_certificate_serial: String::new(),
            certificate_not_after: 0,
            inventory: Default::default(),
            last_seen: 0,
            desired_version: 1,
            state: state.into(),
            state_reason: String::new(),
            state_since: 0,
            retired_at: None,
            desired_image: None,
        }
    }

    #[test]
    fn only_changes_become_transitions_in_order() {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let id = Uuid::new_v4();
        let tracker = HealthTracker::new(
            &[record(id, "unknown")],
            100,
            Duration::from_secs(30),
            sender,
        );
        let healthy = Report {
            checks: vec![check("web", true, true)],
            ..Report::default()
        };
        let broken = Report {
            checks: vec![check("web", true, false)],
            ..Report::default()
        };
        tracker.observe_report(id, healthy.clone(), 101);
        tracker.observe_report(id, healthy.clone(), 102);
        tracker.observe_report(id, broken, 103);
        tracker.observe_report(id, healthy, 104);
        // Silence shorter than the grace period changes nothing; longer does.
        tracker.check_liveness(120);
        tracker.check_liveness(135);
        tracker.check_liveness(140);
        let mut seen = Vec::new();
        while let Ok(transition) = receiver.try_recv() {
            seen.push((transition.from, transition.to, transition.at));
        }
        use MachineState::*;
        assert_eq!(
            seen,
            vec![
                (Unknown, Operational, 101),
                (Operational, Down, 103),
                (Down, Operational, 104),
                (Operational, Unreachable, 135),
            ]
        );
        assert_eq!(tracker.get(id).unwrap().state, Unreachable);
    }

    #[test]
    fn silence_is_measured_from_start_for_machines_that_never_report() {
        let id = Uuid::new_v4();
        let mut machines = HashMap::new();
        let tracked = tracked_from_record(&record(id, "operational"), 1000);
        machines.insert(id, tracked);
        assert!(silent_machines(&machines, 1029, Duration::from_secs(30)).is_empty());
        assert_eq!(
            silent_machines(&machines, 1031, Duration::from_secs(30)),
            vec![id]
        );
    }
}
