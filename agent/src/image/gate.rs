//! The commit gate: after a switch, every check (declared by the image plus
//! the agent's own) must reach `rise` consecutive passes before the deadline,
//! then keep passing (no `fall` failures in a row) for the soak time.

use std::time::Duration;

use flotte_proto::v1::CheckResult;
use tokio::time::Instant;

use crate::health::{CheckSpec, CheckTracker};

#[derive(Debug, Clone, PartialEq)]
pub enum GateOutcome {
    Passed,
    /// Why, and the last result of every check.
    Failed {
        reason: String,
        checks: Vec<CheckResult>,
    },
}

fn result_of(
    spec: &CheckSpec,
    tracker: &CheckTracker,
    passed: bool,
    output: String,
    duration: Duration,
) -> CheckResult {
    CheckResult {
        name: spec.name.clone(),
        kind: String::new(),
        target: String::new(),
        critical: spec.critical,
        healthy: tracker.healthy.unwrap_or(false),
        last_passed: passed,
        last_output: output,
        last_run_at: 0,
        last_duration_ms: u32::try_from(duration.as_millis()).unwrap_or(u32::MAX),
        consecutive: tracker.consecutive,
    }
}

/// Runs `checks` until they pass the gate or fail it. No checks: passes.
pub async fn verify(checks: &[CheckSpec], deadline: Duration, soak: Duration) -> GateOutcome {
    if checks.is_empty() {
        tokio::time::sleep(soak).await;
        return GateOutcome::Passed;
    }
    let probes: Vec<_> = checks.iter().map(|spec| spec.probe.probe()).collect();
    // Start unhealthy: the new image must prove itself with `rise` passes.
    let mut trackers: Vec<CheckTracker> = checks
        .iter()
        .map(|_| CheckTracker {
            healthy: Some(false),
            last_passed: false,
            consecutive: 0,
        })
        .collect();
    let mut results: Vec<CheckResult> = Vec::new();
    let round = checks
        .iter()
        .map(|spec| spec.interval)
        .min()
        .unwrap_or(Duration::from_secs(1));
    let started = Instant::now();
    let mut soak_started: Option<Instant> = None;
    loop {
        results.clear();
        for ((spec, probe), tracker) in checks.iter().zip(&probes).zip(trackers.iter_mut()) {
            let probe_started = Instant::now();
            let outcome = probe.run(spec.timeout).await;
            tracker.observe(outcome.passed, spec.rise, spec.fall);
            results.push(result_of(
                spec,
                tracker,
                outcome.passed,
                outcome.output,
                probe_started.elapsed(),
            ));
        }
        let all_healthy = trackers.iter().all(|tracker| tracker.healthy == Some(true));
        match soak_started {
            None if all_healthy => soak_started = Some(Instant::now()),
            None if started.elapsed() >= deadline => {
                let failing: Vec<&str> = results
                    .iter()
                    .filter(|result| !result.healthy)
                    .map(|result| result.name.as_str())
                    .collect();
                return GateOutcome::Failed {
                    reason: format!(
                        "checks not healthy within {}: {}",
                        humantime::format_duration(deadline),
                        failing.join(", ")
                    ),
                    checks: results,
                };
            }
            None => {}
            Some(_) if !all_healthy => {
                let failing: Vec<&str> = results
                    .iter()
                    .filter(|result| !result.healthy)
                    .map(|result| result.name.as_str())
                    .collect();
                return GateOutcome::Failed {
                    reason: format!("checks failed during the soak: {}", failing.join(", ")),
                    checks: results,
                };
            }
            Some(soaking) if soaking.elapsed() >= soak => return GateOutcome::Passed,
            Some(_) => {}
        }
        tokio::time::sleep(round).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::ProbeSpec;

    fn exec_check(script: &str) -> CheckSpec {
        CheckSpec {
            name: "c".into(),
            probe: ProbeSpec::Exec {
                command: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
            },
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 2,
            critical: true,
        }
    }

    #[tokio::test]
    async fn healthy_checks_pass_after_rise_and_soak() {
        let outcome = verify(
            &[exec_check("true")],
            Duration::from_secs(5),
            Duration::from_millis(100),
        )
        .await;
        assert_eq!(outcome, GateOutcome::Passed);
    }

    #[tokio::test]
    async fn failing_checks_fail_at_the_deadline_with_their_output() {
        let outcome = verify(
            &[exec_check("echo nope; exit 1")],
            Duration::from_millis(200),
            Duration::ZERO,
        )
        .await;
        let GateOutcome::Failed { reason, checks } = outcome else {
            panic!("must fail");
        };
        assert!(reason.contains("not healthy within"), "{reason}");
        assert!(checks[0].last_output.contains("nope"));
    }

    #[tokio::test]
    async fn a_check_that_breaks_during_the_soak_fails_the_gate() {
        let marker = std::env::temp_dir().join(format!("flotte-gate-{}", uuid::Uuid::new_v4()));
        // Passes three times, then fails for good.
        let script = format!(
            "n=$(cat {m} 2>/dev/null || echo 0); echo $((n+1)) > {m}; [ $n -lt 3 ]",
            m = marker.display()
        );
        let outcome = verify(
            &[exec_check(&script)],
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(outcome, GateOutcome::Failed { ref reason, .. } if reason.contains("soak")),
            "{outcome:?}"
        );
        let _ = std::fs::remove_file(marker);
    }
}
