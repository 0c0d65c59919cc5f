//! What the machine is: hostname, OS, kernel, architecture, boot time and
//! uptime, read from the kernel (uname via nix, /proc) and /etc/os-release.

use std::collections::BTreeMap;

use flotte_proto::v1::Inventory;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

fn os_release() -> String {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    parse_os_release(&text).unwrap_or_else(|| "unknown".to_owned())
}

/// The `PRETTY_NAME` of an os-release file, unquoted.
pub fn parse_os_release(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|value| value.trim().trim_matches('"').to_owned())
}

/// Boot time (seconds since the epoch) from the `btime` line of /proc/stat.
pub fn parse_boot_time(proc_stat: &str) -> Option<i64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

pub fn boot_time() -> i64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|text| parse_boot_time(&text))
        .unwrap_or(0)
}

/// Seconds since boot from /proc/uptime.
pub fn uptime_seconds() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| {
            text.split_whitespace()
                .next()
                .and_then(|value| value.parse::<f64>().ok())
        })
        .map_or(0, |seconds| seconds.max(0.0) as u64)
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Collects the inventory sent in the session hello. `hostname_override`
/// lets several agents on one host (demo, tests) tell themselves apart.
pub fn collect(
    hostname_override: Option<&str>,
    labels: &BTreeMap<String, String>,
    zone: &str,
) -> Inventory {
    let kernel = nix::sys::utsname::uname()
        .map(|name| name.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    Inventory {
        hostname: hostname_override.map_or_else(hostname, str::to_owned),
        os: os_release(),
        kernel,
        agent_version: AGENT_VERSION.to_owned(),
        boot_time: boot_time(),
        arch: std::env::consts::ARCH.to_owned(),
        labels: labels.clone().into_iter().collect(),
        zone: zone.to_owned(),
        image: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_os_release_and_boot_time() {
        assert_eq!(
            parse_os_release("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"),
            Some("Debian GNU/Linux 12 (bookworm)".to_owned())
        );
        assert_eq!(parse_os_release("NAME=x"), None);
        assert_eq!(
            parse_boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_boot_time("cpu 1 2\n"), None);
    }

    #[test]
    fn live_inventory_is_filled_from_the_kernel() {
        let inventory = collect(None, &BTreeMap::new(), "dc1");
        assert!(!inventory.kernel.is_empty());
        assert!(inventory.boot_time > 1_000_000_000);
        assert_eq!(inventory.agent_version, AGENT_VERSION);
    }
}
