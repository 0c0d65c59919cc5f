//! Health checks on the agent: their configuration (validated with every
//! problem listed), the rise/fall smoothing that keeps a flapping check from
//! flapping the machine, and the monitor that runs checks and system metrics
//! on their intervals and publishes a snapshot for reports.
//!
//! Checks run whether or not the server is reachable. The monitor never
//! blocks on the session: it publishes into a `watch` channel and the session
//! reads the latest snapshot.

pub mod probes;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotte_proto::http::HttpEndpoint;
use flotte_proto::settings::parse_duration_field;
use flotte_proto::v1::{CheckResult, SystemMetrics};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::unix_now;
use crate::metrics::AgentMetrics;
use crate::system::{breaches, read_metrics, SystemThresholds};
use probes::{ExecProbe, HttpProbe, Probe, ProbeOutcome, TcpProbe};

/// Most checks a machine may declare: keeps reports bounded.
pub const MAX_CHECKS: usize = 64;
/// Shortest check interval: anything faster is a load test, not a check.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

pub use flotte_proto::checks::CheckDefinition as CheckConfigFile;

/// What a check probes, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeSpec {
    Http {
        endpoint: HttpEndpoint,
        expected_status: u16,
    },
    Tcp {
        address: String,
    },
    Exec {
        command: String,
        args: Vec<String>,
    },
}

impl ProbeSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeSpec::Http { .. } => "http",
            ProbeSpec::Tcp { .. } => "tcp",
            ProbeSpec::Exec { .. } => "exec",
        }
    }

    pub fn target(&self) -> String {
        match self {
            ProbeSpec::Http { endpoint, .. } => endpoint.url.to_string(),
            ProbeSpec::Tcp { address } => address.clone(),
            ProbeSpec::Exec { command, args } => std::iter::once(command.as_str())
                .chain(args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    pub fn probe(&self) -> Box<dyn Probe> {
        match self.clone() {
            ProbeSpec::Http {
                endpoint,
                expected_status,
            } => Box::new(HttpProbe {
                endpoint,
                expected_status,
            }),
            ProbeSpec::Tcp { address } => Box::new(TcpProbe { address }),
            ProbeSpec::Exec { command, args } => Box::new(ExecProbe { command, args }),
        }
    }
}

/// A validated check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub name: String,
    pub probe: ProbeSpec,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub critical: bool,
}

fn parse_check_duration(
    name: &str,
    field: &str,
    text: &str,
    problems: &mut Vec<String>,
) -> Duration {
    parse_duration_field(
        &format!("check {name:?}: {field}"),
        text,
        MIN_INTERVAL,
        problems,
    )
}

/// Validates every check, pushing each problem (naming the check) to `problems`.
pub fn validate_checks(checks: Vec<CheckConfigFile>, problems: &mut Vec<String>) -> Vec<CheckSpec> {
    if checks.len() > MAX_CHECKS {
        problems.push(format!(
            "at most {MAX_CHECKS} checks are allowed, {} given",
            checks.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut specs = Vec::new();
    for check in checks {
        let name = check.name.clone();
        if name.is_empty() {
            problems.push("a check has an empty name".to_owned());
        } else if !seen.insert(name.clone()) {
            problems.push(format!("check {name:?} is defined twice"));
        }
        let mut stray = |field: &str, present: bool, kind: &str| {
            if present {
                problems.push(format!(
                    "check {name:?}: {field} is not used by {kind} checks"
                ));
            }
        };
        let probe = match check.kind.as_str() {
            "http" => {
                stray("address", check.address.is_some(), "http");
                stray("command", check.command.is_some(), "http");
                let endpoint = check
                    .url
                    .as_deref()
                    .map(|url| HttpEndpoint::from_settings(url, check.ca_file.as_deref()));
                match endpoint {
                    Some(Ok(endpoint)) => Some(ProbeSpec::Http {
                        endpoint,
                        expected_status: check.expected_status.unwrap_or(200),
                    }),
                    Some(Err(error)) => {
                        problems.push(format!("check {name:?}: {error}"));
                        None
                    }
                    None => {
                        problems.push(format!("check {name:?}: http checks need url"));
                        None
                    }
                }
            }
            "tcp" => {
                stray("url", check.url.is_some(), "tcp");
                stray("ca_file", check.ca_file.is_some(), "tcp");
                stray("command", check.command.is_some(), "tcp");
                match check.address {
                    Some(address)
                        if address.rsplit_once(':').is_some_and(|(host, port)| {
                            !host.is_empty() && port.parse::<u16>().is_ok()
                        }) =>
                    {
                        Some(ProbeSpec::Tcp { address })
                    }
                    Some(address) => {
                        problems.push(format!(
                            "check {name:?}: address {address:?} is not host:port"
                        ));
                        None
                    }
                    None => {
                        problems.push(format!("check {name:?}: tcp checks need address"));
                        None
                    }
                }
            }
            "exec" => {
                stray("url", check.url.is_some(), "exec");
                stray("ca_file", check.ca_file.is_some(), "exec");
                stray("address", check.address.is_some(), "exec");
                match check.command {
                    Some(command) if !command.is_empty() => Some(ProbeSpec::Exec {
                        command,
                        args: check.args,
                    }),
                    _ => {
                        problems.push(format!("check {name:?}: exec checks need command"));
                        None
                    }
                }
            }
            other => {
                problems.push(format!(
                    "check {name:?}: unknown kind {other:?} (expected http, tcp or exec)"
                ));
                None
            }
        };
        let interval = parse_check_duration(&name, "interval", &check.interval, problems);
        let timeout = parse_check_duration(&name, "timeout", &check.timeout, problems);
        if timeout > interval {
            problems.push(format!("check {name:?}: timeout must not exceed interval"));
        }
        if check.rise == 0 || check.fall == 0 {
            problems.push(format!("check {name:?}: rise and fall must be at least 1"));
        }
        if let Some(probe) = probe {
            specs.push(CheckSpec {
                name,
                probe,
                interval,
                timeout,
                rise: check.rise.max(1),
                fall: check.fall.max(1),
                critical: check.critical,
            });
        }
    }
    specs
}

/// Rise/fall smoothing of one check's raw results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckTracker {
    /// `None` until the first result; the first result decides at once (there
    /// is no history to flap from).
    pub healthy: Option<bool>,
    pub last_passed: bool,
    pub consecutive: u32,
}

impl CheckTracker {
    /// Records a raw result; returns true when the smoothed verdict changed.
    pub fn observe(&mut self, passed: bool, rise: u32, fall: u32) -> bool {
        if self.healthy.is_some() && passed == self.last_passed {
            self.consecutive = self.consecutive.saturating_add(1);
        } else {
            self.consecutive = 1;
        }
        self.last_passed = passed;
        let verdict = match self.healthy {
            None => passed,
            Some(true) if !passed && self.consecutive >= fall => false,
            Some(false) if passed && self.consecutive >= rise => true,
            Some(current) => current,
        };
        let changed = self.healthy != Some(verdict);
        self.healthy = Some(verdict);
        changed
    }
}

/// Latest state of every check and of the system metrics.
#[derive(Debug, Clone, Default)]
pub struct HealthSnapshot {
    pub checks: BTreeMap<String, CheckResult>,
    pub metrics: SystemMetrics,
    pub metric_breaches: Vec<String>,
    /// Bumped when a verdict changes (a check turns healthy/unhealthy, or the
    /// set of breached thresholds changes): the session reports at once.
    pub verdict_version: u64,
}

pub type HealthReceiver = watch::Receiver<Arc<HealthSnapshot>>;

/// A receiver that never changes (its sender is gone): for agents without
/// checks, such as the load generator's simulated ones.
pub fn idle_health() -> HealthReceiver {
    watch::channel(Arc::new(HealthSnapshot::default())).1
}

struct Publisher {
    sender: watch::Sender<Arc<HealthSnapshot>>,
    snapshot: Mutex<HealthSnapshot>,
}

impl Publisher {
    fn update(&self, change: impl FnOnce(&mut HealthSnapshot) -> bool) {
        let Ok(mut snapshot) = self.snapshot.lock() else {
            return;
        };
        if change(&mut snapshot) {
            snapshot.verdict_version += 1;
        }
        self.sender.send_replace(Arc::new(snapshot.clone()));
    }
}

async fn run_check(
    spec: CheckSpec,
    publisher: Arc<Publisher>,
    metrics: AgentMetrics,
    shutdown: CancellationToken,
) {
    let probe = spec.probe.probe();
    let mut tracker = CheckTracker::default();
    let mut ticker = tokio::time::interval(spec.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let started = tokio::time::Instant::now();
        let ProbeOutcome { passed, output } = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = probe.run(spec.timeout) => outcome,
        };
        let duration = started.elapsed();
        let changed = tracker.observe(passed, spec.rise, spec.fall);
        let healthy = tracker.healthy.unwrap_or(passed);
        metrics.record_check(&spec.name, passed, healthy, duration);
        if changed {
            tracing::info!(check = %spec.name, healthy, output = %output.lines().next().unwrap_or(""), "check verdict changed");
        }
        let result = CheckResult {
            name: spec.name.clone(),
            kind: spec.probe.kind().to_owned(),
            target: spec.probe.target(),
            critical: spec.critical,
            healthy,
            last_passed: passed,
            last_output: output,
            last_run_at: unix_now(),
            last_duration_ms: u32::try_from(duration.as_millis()).unwrap_or(u32::MAX),
            consecutive: tracker.consecutive,
        };
        publisher.update(|snapshot| {
            snapshot.checks.insert(spec.name.clone(), result);
            changed
        });
    }
}

async fn run_system_metrics(
    thresholds: SystemThresholds,
    interval: Duration,
    publisher: Arc<Publisher>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mounts = thresholds.mounts.clone();
        let Ok(metrics) = tokio::task::spawn_blocking(move || read_metrics(&mounts)).await else {
            continue;
        };
        let found = breaches(&metrics, &thresholds);
        publisher.update(|snapshot| {
            let changed = snapshot.metric_breaches != found;
            if changed {
                tracing::info!(breaches = ?found, "system thresholds changed");
            }
            snapshot.metrics = metrics;
            snapshot.metric_breaches = found;
            changed
        });
    }
}

/// Starts every check and the system metrics loop; returns the snapshot receiver.
pub fn start_monitor(
    checks: Vec<CheckSpec>,
    thresholds: SystemThresholds,
    metrics_interval: Duration,
    metrics: AgentMetrics,
    shutdown: CancellationToken,
) -> HealthReceiver {
    let (sender, receiver) = watch::channel(Arc::new(HealthSnapshot::default()));
    let publisher = Arc::new(Publisher {
        sender,
        snapshot: Mutex::new(HealthSnapshot::default()),
    });
    for spec in checks {
        tokio::spawn(run_check(
            spec,
            Arc::clone(&publisher),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(run_system_metrics(
        thresholds,
        metrics_interval,
        publisher,
        shutdown,
    ));
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_smooth_flapping_results() {
        // (raw results, rise, fall, expected verdict after each result)
        let cases: &[(&[bool], u32, u32, &[bool])] = &[
            (&[true, true, true], 2, 3, &[true, true, true]),
            (&[false], 2, 3, &[false]),
            (
                &[true, false, false, false],
                2,
                3,
                &[true, true, true, false],
            ),
            (&[true, false, true, false, true, false], 2, 2, &[true; 6]),
            (
                &[false, true, false, true, true],
                2,
                3,
                &[false, false, false, false, true],
            ),
            (
                &[true, false, false, true, true, true],
                3,
                2,
                &[true, true, false, false, false, true],
            ),
            (&[true, false], 1, 1, &[true, false]),
        ];
        for (results, rise, fall, expected) in cases {
            let mut tracker = CheckTracker::default();
            let verdicts: Vec<bool> = results
                .iter()
                .map(|passed| {
                    tracker.observe(*passed, *rise, *fall);
                    tracker.healthy.unwrap_or(false)
                })
                .collect();
            assert_eq!(
                &verdicts, expected,
                "results {results:?} rise {rise} fall {fall}"
            );
        }
    }

    fn check(kind: &str) -> CheckConfigFile {
        CheckConfigFile {
            name: format!("{kind}-check"),
            kind: kind.to_owned(),
            url: None,
            ca_file: None,
            expected_status: None,
            address: None,
            command: None,
            args: Vec::new(),
            interval: "1s".into(),
            timeout: "1s".into(),
            rise: 1,
            fall: 1,
            critical: true,
        }
    }

    #[test]
    fn bad_checks_are_all_reported() {
        let mut zero_interval = check("exec");
        zero_interval.command = Some("/bin/true".into());
        zero_interval.interval = "0s".into();
        let unknown_kind = check("ping");
        let mut bad_url = check("http");
        bad_url.url = Some("not a url".into());
        let mut no_address = check("tcp");
        no_address.url = Some("http://x/".into());
        no_address.ca_file = Some("/etc/ssl/certs/ca-certificates.crt".into());
        let mut duplicate = check("exec");
        duplicate.command = Some("/bin/true".into());
        let mut problems = Vec::new();
        let specs = validate_checks(
            vec![zero_interval, unknown_kind, bad_url, no_address, duplicate],
            &mut problems,
        );
        let all = problems.join("\n");
        for expected in [
            "check \"exec-check\": interval = \"0s\" is too short",
            "check \"ping-check\": unknown kind \"ping\"",
            "check \"http-check\": URL \"not a url\"",
            "check \"tcp-check\": url is not used by tcp checks",
            "check \"tcp-check\": ca_file is not used by tcp checks",
            "check \"tcp-check\": tcp checks need address",
            "check \"exec-check\" is defined twice",
            "timeout must not exceed interval",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert_eq!(
            specs.len(),
            2,
            "the two valid exec checks survive for the count"
        );
    }

    #[test]
    fn valid_checks_get_defaults() {
        let mut http = check("http");
        http.url = Some("http://127.0.0.1:8080/health".into());
        let mut problems = Vec::new();
        let specs = validate_checks(vec![http], &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            specs[0].probe,
            ProbeSpec::Http {
                endpoint: HttpEndpoint::from_settings("http://127.0.0.1:8080/health", None)
                    .unwrap(),
                expected_status: 200
            }
        );
    }
}
