//! System metrics read from the kernel — disk usage of configured mounts
//! (statvfs), memory (/proc/meminfo), load average (/proc/loadavg), uptime —
//! and the thresholds that make a machine degraded.
//!
//! Reading is I/O; deciding which thresholds are exceeded is a pure function
//! ([`breaches`]) so that it is tested without a full disk.

use std::path::PathBuf;

use flotte_proto::v1::{DiskUsage, SystemMetrics};

/// Validated thresholds; `None` disables a threshold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SystemThresholds {
    pub mounts: Vec<PathBuf>,
    pub disk_used_percent_max: Option<f64>,
    pub memory_available_percent_min: Option<f64>,
    pub load1_max: Option<f64>,
}

fn disk_usage(mount: &std::path::Path) -> Option<DiskUsage> {
    let stats = nix::sys::statvfs::statvfs(mount).ok()?;
    let fragment = stats.fragment_size();
    let total = stats.blocks().saturating_mul(fragment);
    let free = stats.blocks_free().saturating_mul(fragment);
    let available = stats.blocks_available().saturating_mul(fragment);
    Some(DiskUsage {
        mount: mount.display().to_string(),
        total_bytes: total,
        used_bytes: total.saturating_sub(free),
        available_bytes: available,
    })
}

/// `(MemTotal, MemAvailable)` in bytes from /proc/meminfo text.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kibibytes| kibibytes.saturating_mul(1024))
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// The three load averages from /proc/loadavg text.
pub fn parse_loadavg(text: &str) -> (f64, f64, f64) {
    let mut values = text
        .split_whitespace()
        .map(|value| value.parse::<f64>().unwrap_or(0.0));
    (
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
        values.next().unwrap_or(0.0),
    )
}

/// Reads the current metrics for the configured mounts.
pub fn read_metrics(mounts: &[PathBuf]) -> SystemMetrics {
    let (memory_total_bytes, memory_available_bytes) =
        parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
    let (load1, load5, load15) =
        parse_loadavg(&std::fs::read_to_string("/proc/loadavg").unwrap_or_default());
    SystemMetrics {
        disks: mounts
            .iter()
            .filter_map(|mount| disk_usage(mount))
            .collect(),
        memory_total_bytes,
        memory_available_bytes,
        load1,
        load5,
        load15,
        uptime_seconds: crate::inventory::uptime_seconds(),
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// The thresholds `metrics` exceeds, as sentences for people.
pub fn breaches(metrics: &SystemMetrics, thresholds: &SystemThresholds) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(maximum) = thresholds.disk_used_percent_max {
        for disk in &metrics.disks {
            let used = percent(disk.used_bytes, disk.total_bytes);
            if used > maximum {
                found.push(format!(
                    "disk {}: {used:.1}% used (max {maximum}%)",
                    disk.mount
                ));
            }
        }
    }
    if let Some(minimum) = thresholds.memory_available_percent_min {
        let available = percent(metrics.memory_available_bytes, metrics.memory_total_bytes);
        if metrics.memory_total_bytes > 0 && available < minimum {
            found.push(format!(
                "memory: {available:.1}% available (min {minimum}%)"
            ));
        }
    }
    if let Some(maximum) = thresholds.load1_max {
        if metrics.load1 > maximum {
            found.push(format!("load: {:.2} (max {maximum})", metrics.load1));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let (total, available) =
            parse_meminfo("MemTotal:  1000 kB\nMemFree: 5 kB\nMemAvailable:   250 kB\n");
        assert_eq!((total, available), (1_024_000, 256_000));
        assert_eq!(parse_loadavg("0.50 1.25 2.00 1/100 42"), (0.5, 1.25, 2.0));
    }

    #[test]
    fn thresholds_name_what_is_exceeded() {
        let metrics = SystemMetrics {
            disks: vec![DiskUsage {
                mount: "/".into(),
                total_bytes: 100,
                used_bytes: 95,
                available_bytes: 5,
            }],
            memory_total_bytes: 100,
            memory_available_bytes: 3,
            load1: 9.0,
            ..SystemMetrics::default()
        };
        let cases = [
            (SystemThresholds::default(), 0),
            (
                SystemThresholds {
                    disk_used_percent_max: Some(90.0),
                    ..SystemThresholds::default()
                },
                1,
            ),
            (
                SystemThresholds {
                    disk_used_percent_max: Some(96.0),
                    memory_available_percent_min: Some(5.0),
                    load1_max: Some(8.0),
                    ..SystemThresholds::default()
                },
                2,
            ),
        ];
        for (thresholds, expected) in cases {
            assert_eq!(
                breaches(&metrics, &thresholds).len(),
                expected,
                "{thresholds:?}"
            );
        }
        let found = breaches(
            &metrics,
            &SystemThresholds {
                disk_used_percent_max: Some(90.0),
                ..SystemThresholds::default()
            },
        );
        assert_eq!(found, vec!["disk /: 95.0% used (max 90%)".to_owned()]);
    }

    #[test]
    fn reads_the_root_filesystem() {
        let metrics = read_metrics(&[PathBuf::from("/")]);
        assert_eq!(metrics.disks.len(), 1);
        assert!(metrics.disks[0].total_bytes > 0);
        assert!(metrics.memory_total_bytes > 0);
    }
}
