//! Machine health, decided: the states a machine can be in (`operational`,
//! `degraded`, `down`, `unreachable`, `unknown` before the first report, and
//! the administrative, final `retired`), the health report an agent sends as
//! the server keeps it, the state a report describes, and which machines have
//! been silent too long.
//!
//! What must never live here: the tracker that remembers each machine's
//! state (that is `live::health`), a clock read, or a generated proto type —
//! the session edge converts the agent's report into a [`HealthReport`] and
//! the machines edge converts it back for display.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::UnixSeconds;

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

/// One periodic report of an agent: its checks, its system metrics and the
/// thresholds they exceed, and where it is with images. Every field the
/// agent sends is kept, because `machines show` displays them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthReport {
    /// Agent clock, not to be trusted for liveness (the tracker uses its own).
    pub sent_at: UnixSeconds,
    pub uptime_seconds: u64,
    pub sequence: u64,
    /// After the agent's rise/fall smoothing.
    pub checks: Vec<CheckReport>,
    pub metrics: Option<SystemMetrics>,
    /// Metric thresholds exceeded, e.g. "disk /: 93.1% used (max 90%)".
    pub metric_breaches: Vec<String>,
    pub image: Option<ImageStatus>,
    /// Differences the agent's last verification found in the image it
    /// runs (0: none, or not verified yet).
    pub image_drift_files: u64,
}

/// One health check as the agent last ran it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    pub name: String,
    /// "http", "tcp" or "exec".
    pub kind: String,
    /// What is probed: URL, address or command line.
    pub target: String,
    pub critical: bool,
    /// The smoothed verdict, which is what the machine's state follows.
    pub healthy: bool,
    /// The latest raw result.
    pub last_passed: bool,
    pub last_output: String,
    pub last_run_at: UnixSeconds,
    pub last_duration_ms: u32,
    /// How many of the latest raw results in a row equal `last_passed`.
    pub consecutive: u32,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SystemMetrics {
    pub disks: Vec<DiskUsage>,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub uptime_seconds: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub mount: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}

/// An image as the agent names it: by name and version, pinned by digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedImage {
    pub name: String,
    pub version: String,
    /// Lowercase hex SHA-256 of the payload.
    pub digest: String,
}

/// Where the machine is with images.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStatus {
    pub current: Option<ReportedImage>,
    pub previous: Option<ReportedImage>,
    pub swap: Option<SwapStatus>,
}

/// The agent's latest image swap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapStatus {
    pub target: Option<ReportedImage>,
    /// downloading, verifying_payload, unpacking, switching, verifying,
    /// committed, rolling_back, rolled_back, failed.
    pub step: String,
    /// in_progress, committed, failed.
    pub outcome: String,
    pub message: String,
    pub bytes_downloaded: u64,
    pub updated_at: UnixSeconds,
    /// Last outputs of the checks when the verification failed.
    pub checks: Vec<CheckReport>,
}

impl HealthReport {
    /// The image the agent says it runs now, if it names one.
    pub fn current_image(&self) -> Option<&ReportedImage> {
        self.image.as_ref().and_then(|image| image.current.as_ref())
    }
}

/// The first non-blank line of `text`, at most 120 characters: enough to name
/// the problem in a state reason without carrying a whole check output.
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
/// check, an exceeded metric threshold or image drift makes it `degraded`.
pub fn state_from_report(report: &HealthReport) -> (MachineState, String) {
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
    if report.image_drift_files > 0 {
        problems.push(format!(
            "image drift: {} files changed",
            report.image_drift_files
        ));
    }
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

/// What silence detection needs to know of one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastHeard {
    pub machine_id: Uuid,
    pub state: MachineState,
    /// Server clock.
    pub last_report_at: UnixSeconds,
}

/// Which machines have been silent longer than `grace` at `now`, sorted.
/// Machines already `unreachable` (nothing new to say) or `retired` (never
/// expected to report) are left out.
pub fn silent_machines(
    machines: impl IntoIterator<Item = LastHeard>,
    now: UnixSeconds,
    grace: Duration,
) -> Vec<Uuid> {
    let grace = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    let mut silent: Vec<Uuid> = machines
        .into_iter()
        .filter(|machine| {
            !matches!(
                machine.state,
                MachineState::Unreachable | MachineState::Retired
            ) && now.saturating_sub(machine.last_report_at) > grace
        })
        .map(|machine| machine.machine_id)
        .collect();
    silent.sort();
    silent
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, critical: bool, healthy: bool) -> CheckReport {
        CheckReport {
            name: name.into(),
            critical,
            healthy,
            last_output: if healthy {
                String::new()
            } else {
                format!("\n{name} broke\nmore")
            },
            ..CheckReport::default()
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
            (
                vec![check("web", true, true)],
                vec![],
                MachineState::Degraded,
                "image drift: 3 files changed",
            ),
        ];
        for (index, (checks, breaches, expected_state, expected_reason)) in
            cases.into_iter().enumerate()
        {
            let report = HealthReport {
                checks,
                metric_breaches: breaches,
                // The last case: a healthy machine whose image drifted.
                image_drift_files: if index == 6 { 3 } else { 0 },
                ..HealthReport::default()
            };
            let (state, reason) = state_from_report(&report);
            assert_eq!(state, expected_state, "{reason}");
            assert!(
                reason.contains(expected_reason),
                "{reason:?} lacks {expected_reason:?}"
            );
        }
    }

    #[test]
    fn a_long_check_output_is_cut_to_its_first_line_in_the_reason() {
        let mut broken = check("web", true, false);
        broken.last_output = format!("\n  \n{}\nsecond line", "x".repeat(500));
        let report = HealthReport {
            checks: vec![broken],
            ..HealthReport::default()
        };
        let (_, reason) = state_from_report(&report);
        assert_eq!(
            reason,
            format!("critical check web failing: {}", "x".repeat(120))
        );
    }

    #[test]
    fn silence_longer_than_grace_counts_except_when_unreachable_or_retired() {
        let grace = Duration::from_secs(30);
        let heard = |n: u128, state: MachineState, last_report_at: UnixSeconds| LastHeard {
            machine_id: Uuid::from_u128(n),
            state,
            last_report_at,
        };
        let machines = [
            heard(4, MachineState::Operational, 1000),
            heard(1, MachineState::Down, 969),
            heard(2, MachineState::Degraded, 970),
            heard(3, MachineState::Unreachable, 0),
            heard(5, MachineState::Retired, 0),
            heard(6, MachineState::Unknown, 900),
        ];
        assert_eq!(
            silent_machines(machines, 1000, grace),
            vec![Uuid::from_u128(1), Uuid::from_u128(6)]
        );
        // Exactly `grace` of silence is still in time.
        assert!(silent_machines(machines, 930, grace).is_empty());
    }

    #[test]
    fn state_names_parse_back() {
        for state in MachineState::ALL {
            assert_eq!(MachineState::parse(state.as_str()), Some(state));
        }
        assert_eq!(MachineState::parse("fine"), None);
    }
}
