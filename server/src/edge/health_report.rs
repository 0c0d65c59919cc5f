//! An agent's health report, both ways across the edge: the wire `Report`
//! into the domain `HealthReport` the tracker keeps (bounded on the way in),
//! and back into the wire form for `machines show`. Written once each way,
//! with a round-trip test.

use flotte_proto::v1::{
    CheckResult, DiskUsage as ProtoDiskUsage, ImageRef, ImageStatus as ProtoImageStatus, Report,
    SwapStatus as ProtoSwapStatus, SystemMetrics as ProtoSystemMetrics,
};

use crate::domain::health::{
    CheckReport, DiskUsage, HealthReport, ImageStatus, ReportedImage, SwapStatus, SystemMetrics,
};

/// Checks kept per report (the agent accepts at most this many).
pub const MAX_REPORTED_CHECKS: usize = 64;
/// Output kept per check (what the agent keeps of a probe's output).
pub const MAX_CHECK_OUTPUT_BYTES: usize = 4096;
/// Breaches and disks kept per report.
const MAX_REPORTED_ITEMS: usize = 64;
/// Names, targets, mounts, image references and breach texts.
const MAX_REPORTED_TEXT_BYTES: usize = 1024;

/// `text` cut to at most `max` bytes, on a character boundary.
pub(crate) fn bounded_text(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The wire form of a machine's last report, for display (`machines show`
/// shows its checks, metrics and images exactly as the agent sent them).
pub fn health_report_to_proto(report: &HealthReport) -> Report {
    Report {
        sent_at: report.sent_at,
        uptime_seconds: report.uptime_seconds,
        sequence: report.sequence,
        checks: report.checks.iter().map(check_to_proto).collect(),
        metrics: report.metrics.as_ref().map(|metrics| ProtoSystemMetrics {
            disks: metrics
                .disks
                .iter()
                .map(|disk| ProtoDiskUsage {
                    mount: disk.mount.clone(),
                    total_bytes: disk.total_bytes,
                    used_bytes: disk.used_bytes,
                    available_bytes: disk.available_bytes,
                })
                .collect(),
            memory_total_bytes: metrics.memory_total_bytes,
            memory_available_bytes: metrics.memory_available_bytes,
            load1: metrics.load1,
            load5: metrics.load5,
            load15: metrics.load15,
            uptime_seconds: metrics.uptime_seconds,
        }),
        metric_breaches: report.metric_breaches.clone(),
        image: report.image.as_ref().map(image_status_to_proto),
        image_drift_files: report.image_drift_files,
    }
}

pub fn image_status_to_proto(image: &ImageStatus) -> ProtoImageStatus {
    ProtoImageStatus {
        current: image.current.as_ref().map(image_to_proto),
        previous: image.previous.as_ref().map(image_to_proto),
        swap: image.swap.as_ref().map(|swap| ProtoSwapStatus {
            target: swap.target.as_ref().map(image_to_proto),
            step: swap.step.clone(),
            outcome: swap.outcome.clone(),
            message: swap.message.clone(),
            bytes_downloaded: swap.bytes_downloaded,
            updated_at: swap.updated_at,
            checks: swap.checks.iter().map(check_to_proto).collect(),
        }),
    }
}

fn check_to_proto(check: &CheckReport) -> CheckResult {
    CheckResult {
        name: check.name.clone(),
        kind: check.kind.clone(),
        target: check.target.clone(),
        critical: check.critical,
        healthy: check.healthy,
        last_passed: check.last_passed,
        last_output: check.last_output.clone(),
        last_run_at: check.last_run_at,
        last_duration_ms: check.last_duration_ms,
        consecutive: check.consecutive,
    }
}

fn image_to_proto(image: &ReportedImage) -> ImageRef {
    ImageRef {
        name: image.name.clone(),
        version: image.version.clone(),
        digest: image.digest.clone(),
    }
}

/// An agent's report as the health tracker keeps it: every field, moved
/// (the machines edge turns it back into the wire form for display).
///
/// Bounded here, before the tracker keeps it for as long as the session
/// lasts: at most the agent's own limits ([`MAX_REPORTED_CHECKS`] checks,
/// [`MAX_CHECK_OUTPUT_BYTES`] of output each, and as many breaches and
/// disks); a larger report is cut, never refused, so the machine's state
/// still follows it.
pub fn health_report_from_proto(report: Report) -> HealthReport {
    HealthReport {
        sent_at: report.sent_at,
        uptime_seconds: report.uptime_seconds,
        sequence: report.sequence,
        checks: checks_from_proto(report.checks),
        metrics: report.metrics.map(|metrics| SystemMetrics {
            disks: metrics
                .disks
                .into_iter()
                .take(MAX_REPORTED_ITEMS)
                .map(|disk| DiskUsage {
                    mount: bounded_text(disk.mount, MAX_REPORTED_TEXT_BYTES),
                    total_bytes: disk.total_bytes,
                    used_bytes: disk.used_bytes,
                    available_bytes: disk.available_bytes,
                })
                .collect(),
            memory_total_bytes: metrics.memory_total_bytes,
            memory_available_bytes: metrics.memory_available_bytes,
            load1: metrics.load1,
            load5: metrics.load5,
            load15: metrics.load15,
            uptime_seconds: metrics.uptime_seconds,
        }),
        metric_breaches: report
            .metric_breaches
            .into_iter()
            .take(MAX_REPORTED_ITEMS)
            .map(|breach| bounded_text(breach, MAX_REPORTED_TEXT_BYTES))
            .collect(),
        image: report.image.map(|image| ImageStatus {
            current: image.current.map(image_from_proto),
            previous: image.previous.map(image_from_proto),
            swap: image.swap.map(|swap| SwapStatus {
                target: swap.target.map(image_from_proto),
                step: bounded_text(swap.step, MAX_REPORTED_TEXT_BYTES),
                outcome: bounded_text(swap.outcome, MAX_REPORTED_TEXT_BYTES),
                message: bounded_text(swap.message, MAX_CHECK_OUTPUT_BYTES),
                bytes_downloaded: swap.bytes_downloaded,
                updated_at: swap.updated_at,
                checks: checks_from_proto(swap.checks),
            }),
        }),
        image_drift_files: report.image_drift_files,
    }
}

fn checks_from_proto(checks: Vec<CheckResult>) -> Vec<CheckReport> {
    checks
        .into_iter()
        .take(MAX_REPORTED_CHECKS)
        .map(check_from_proto)
        .collect()
}

fn check_from_proto(check: CheckResult) -> CheckReport {
    CheckReport {
        name: bounded_text(check.name, MAX_REPORTED_TEXT_BYTES),
        kind: bounded_text(check.kind, MAX_REPORTED_TEXT_BYTES),
        target: bounded_text(check.target, MAX_REPORTED_TEXT_BYTES),
        critical: check.critical,
        healthy: check.healthy,
        last_passed: check.last_passed,
        last_output: bounded_text(check.last_output, MAX_CHECK_OUTPUT_BYTES),
        last_run_at: check.last_run_at,
        last_duration_ms: check.last_duration_ms,
        consecutive: check.consecutive,
    }
}

pub(crate) fn image_from_proto(image: ImageRef) -> ReportedImage {
    ReportedImage {
        name: bounded_text(image.name, MAX_REPORTED_TEXT_BYTES),
        version: bounded_text(image.version, MAX_REPORTED_TEXT_BYTES),
        digest: bounded_text(image.digest, MAX_REPORTED_TEXT_BYTES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, healthy: bool) -> CheckResult {
        CheckResult {
            name: name.to_owned(),
            kind: "http".to_owned(),
            target: format!("http://127.0.0.1:8080/{name}"),
            critical: true,
            healthy,
            last_passed: !healthy,
            last_output: format!("{name}: HTTP 503\nbody"),
            last_run_at: 1_700_000_001,
            last_duration_ms: 17,
            consecutive: 3,
        }
    }

    fn image(version: &str, digest: &str) -> ImageRef {
        ImageRef {
            name: "app".to_owned(),
            version: version.to_owned(),
            digest: digest.to_owned(),
        }
    }

    /// Every field of the agent's report set to a distinct value, so that a
    /// field lost or swapped on the way through the domain type shows.
    fn full_report() -> Report {
        Report {
            sent_at: 1_700_000_000,
            uptime_seconds: 3600,
            sequence: 42,
            checks: vec![check("web", true), check("cache", false)],
            metrics: Some(ProtoSystemMetrics {
                disks: vec![ProtoDiskUsage {
                    mount: "/".to_owned(),
                    total_bytes: 1000,
                    used_bytes: 930,
                    available_bytes: 70,
                }],
                memory_total_bytes: 8_000,
                memory_available_bytes: 3_000,
                load1: 0.5,
                load5: 0.25,
                load15: 0.125,
                uptime_seconds: 3599,
            }),
            metric_breaches: vec!["disk /: 93.0% used (max 90%)".to_owned()],
            image: Some(ProtoImageStatus {
                current: Some(image("1.0.0", "aa")),
                previous: Some(image("0.9.0", "bb")),
                swap: Some(ProtoSwapStatus {
                    target: Some(image("1.1.0", "cc")),
                    step: "verifying".to_owned(),
                    outcome: "failed".to_owned(),
                    message: "check web failed".to_owned(),
                    bytes_downloaded: 123_456,
                    updated_at: 1_700_000_002,
                    checks: vec![check("web", false)],
                }),
            }),
            image_drift_files: 7,
        }
    }

    #[test]
    fn a_report_survives_the_round_trip_through_the_domain_type() {
        let report = full_report();
        let domain = health_report_from_proto(report.clone());
        assert_eq!(domain.checks[1].name, "cache");
        assert_eq!(
            domain.current_image().map(|image| image.digest.as_str()),
            Some("aa")
        );
        assert_eq!(health_report_to_proto(&domain), report);
    }

    #[test]
    fn absent_parts_stay_absent_through_the_round_trip() {
        let report = Report {
            image: Some(ProtoImageStatus {
                current: None,
                previous: Some(ImageRef::default()),
                swap: Some(ProtoSwapStatus::default()),
            }),
            ..Report::default()
        };
        let domain = health_report_from_proto(report.clone());
        assert_eq!(domain.metrics, None);
        assert_eq!(health_report_to_proto(&domain), report);
    }

    #[test]
    fn an_oversized_report_is_cut_to_the_agents_own_limits() {
        let mut report = full_report();
        report.checks = (0..200)
            .map(|index| CheckResult {
                last_output: "é".repeat(10_000),
                ..check(&format!("c{index}"), false)
            })
            .collect();
        report.metric_breaches = vec!["x".repeat(5_000); 500];
        let kept = health_report_from_proto(report);
        assert_eq!(kept.checks.len(), MAX_REPORTED_CHECKS);
        assert!(kept
            .checks
            .iter()
            .all(|check| check.last_output.len() <= MAX_CHECK_OUTPUT_BYTES
                && check.last_output.starts_with('é')));
        assert_eq!(kept.metric_breaches.len(), MAX_REPORTED_ITEMS);
        assert!(kept
            .metric_breaches
            .iter()
            .all(|breach| breach.len() == MAX_REPORTED_TEXT_BYTES));
    }
}
