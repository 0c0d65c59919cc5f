//! The load generator's parts for several replicas: the server processes
//! it samples (one, or one per replica, each labelled), the CPU time of the
//! PostgreSQL they share (the postmaster and every process it started: one
//! backend per connection plus its background workers), and the reconnect
//! storm after one replica is killed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    read_proc_file, sample_process, stat_cpu_ticks, FleetCounters, LoadgenError, ProcessSample,
};

/// How often the connected count is read while agents reconnect.
const RECONNECT_POLL: Duration = Duration::from_millis(10);

/// The server processes whose memory and CPU are sampled.
pub struct ServerProcesses {
    /// (label, pid) — "server" alone, "server PID" among several.
    processes: Vec<(String, String)>,
}

impl ServerProcesses {
    pub fn new(pids: &[u32]) -> Self {
        let processes = pids
            .iter()
            .map(|pid| {
                let label = if pids.len() == 1 {
                    "server".to_owned()
                } else {
                    format!("server {pid}")
                };
                (label, pid.to_string())
            })
            .collect();
        ServerProcesses { processes }
    }

    pub fn len(&self) -> usize {
        self.processes.len()
    }

    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.processes.iter().map(|(label, _)| label.as_str())
    }

    /// One sample of each process, in order.
    pub fn sample(&self) -> Result<Vec<ProcessSample>, LoadgenError> {
        self.processes
            .iter()
            .map(|(_, pid)| sample_process(pid))
            .collect()
    }
}

/// (parent pid, utime + stime) from the text of `/proc/PID/stat`; fields
/// are counted after the command's last ')' (it may hold both), where the
/// first one is field 3 (state) and the parent is field 4.
fn parent_and_cpu_ticks(stat: &str) -> Option<(u32, u64)> {
    let parent = stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(4 - 3)?
        .parse()
        .ok()?;
    Some((parent, stat_cpu_ticks(stat)?))
}

/// CPU ticks of the postmaster `postmaster` and of its children together,
/// and how many children it has now. A backend that ended during the
/// window takes its ticks with it: the replicas' pooled connections live
/// as long as the replicas, so none should.
pub fn postgres_cpu_ticks(postmaster: u32) -> Result<(u64, usize), LoadgenError> {
    let own = read_proc_file(&format!("/proc/{postmaster}/stat"))?;
    let (_, mut ticks) = parent_and_cpu_ticks(&own).ok_or_else(|| LoadgenError::Proc {
        path: format!("/proc/{postmaster}/stat"),
        message: "no ppid/utime/stime".to_owned(),
    })?;
    let mut children = 0;
    let entries = std::fs::read_dir("/proc").map_err(|error| LoadgenError::Proc {
        path: "/proc".to_owned(),
        message: error.to_string(),
    })?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((parent, child_ticks)) = parent_and_cpu_ticks(&stat) {
            if parent == postmaster {
                ticks += child_ticks;
                children += 1;
            }
        }
    }
    Ok((ticks, children))
}

/// SIGKILLs the server `pid`, then times its sessions dropping and every
/// one of the `agents` being connected again (through the other servers
/// given, after the agents' jittered backoff).
pub async fn measure_reconnect_storm(
    pid: u32,
    counters: &FleetCounters,
    agents: usize,
    timeout: Duration,
) -> Result<(), LoadgenError> {
    let connected = || counters.connected.load(Ordering::Relaxed);
    let failures_before = counters.session_failures.load(Ordering::Relaxed);
    let process = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    nix::sys::signal::kill(process, nix::sys::signal::Signal::SIGKILL)
        .map_err(|error| LoadgenError::Reconnect(format!("SIGKILL to {pid}: {error}")))?;
    let killed_at = Instant::now();
    let mut fewest = connected();
    let mut dropped_by: Option<Duration> = None;
    loop {
        let now = connected();
        if now < fewest {
            fewest = now;
            dropped_by = Some(killed_at.elapsed());
        }
        if fewest < agents && now >= agents {
            break;
        }
        if killed_at.elapsed() > timeout {
            return Err(LoadgenError::Reconnect(format!(
                "{now} of {agents} agents connected {timeout:?} after killing {pid} (fewest {fewest})"
            )));
        }
        tokio::time::sleep(RECONNECT_POLL).await;
    }
    let back_after = killed_at.elapsed();
    println!(
        "reconnect storm: server {pid} SIGKILLed; {} sessions dropped (fewest connected {fewest} of {agents}, reached after {:.2} s); all {agents} connected again after {:.2} s; {} session failure(s) on the way",
        agents - fewest,
        dropped_by.unwrap_or_default().as_secs_f64(),
        back_after.as_secs_f64(),
        counters
            .session_failures
            .load(Ordering::Relaxed)
            .saturating_sub(failures_before)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_parent_and_cpu_time() {
        let stat = "4242 (postgres: x (y)) S 77 4242 4242 0 -1 4194560 1 0 0 0 30 12 0 0 20 0 1 0";
        assert_eq!(parent_and_cpu_ticks(stat), Some((77, 42)));
        assert_eq!(parent_and_cpu_ticks("4242 (cut"), None);
    }

    #[test]
    fn one_server_keeps_its_plain_label_and_several_are_told_apart() {
        assert_eq!(
            ServerProcesses::new(&[7]).labels().collect::<Vec<_>>(),
            ["server"]
        );
        assert_eq!(
            ServerProcesses::new(&[7, 8]).labels().collect::<Vec<_>>(),
            ["server 7", "server 8"]
        );
    }
}
