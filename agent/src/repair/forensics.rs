//! The forensic bundle a quarantined machine collects: a tar of small text
//! and JSON files — service log tail, last check results with outputs,
//! process list, mounts, disk and memory figures, kernel messages if
//! readable, and the image swap journal. Every part is bounded, and a part
//! that cannot be read says why instead of failing the bundle.
//!
//! Collection reads only: nothing on the machine is changed or removed.
//! Every read is bounded before it costs memory (processes choose their
//! command lines, and a user can start thousands), and the service log is
//! opened under the rules of `user_files` (no symbolic link, no FIFO,
//! regular files of the agent or root only). Collection blocks: it runs on
//! the blocking pool, with a timeout, never on the quarantine manager's task.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::health::HealthSnapshot;
use crate::user_files::{open_checked, split_base, Owner};

/// Bytes kept from the end of the service log.
pub const SERVICE_LOG_TAIL_BYTES: u64 = 256 * 1024;
/// Bytes of kernel messages kept (the newest).
const KERNEL_MESSAGES_BYTES: usize = 256 * 1024;
/// Processes listed at most.
const MAX_PROCESSES: usize = 4096;
/// Any one part is cut at this size.
const MAX_PART_BYTES: usize = 1024 * 1024;
/// Bytes of one process's command line kept (the kernel allows megabytes).
const MAX_COMMAND_LINE_BYTES: u64 = 4096;
/// `/proc/<pid>/stat` is one short line.
const MAX_STAT_BYTES: u64 = 4096;

/// One file of the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundlePart {
    pub name: String,
    pub bytes: Vec<u8>,
}

fn part(name: &str, bytes: Vec<u8>) -> BundlePart {
    let mut bytes = bytes;
    bytes.truncate(MAX_PART_BYTES);
    BundlePart {
        name: name.to_owned(),
        bytes,
    }
}

/// What to collect from where.
#[derive(Debug, Clone)]
pub struct CollectionSources {
    pub data_dir: PathBuf,
    /// The supervised service's log, if the agent runs one.
    pub service_log: Option<PathBuf>,
    pub mounts: Vec<PathBuf>,
    pub proc_root: PathBuf,
    /// List processes by their short kernel name only, never their command
    /// lines (which can hold secrets passed as arguments).
    pub omit_command_lines: bool,
}

/// The end of a file the agent writes (all of it if shorter than
/// `limit`), opened under the rules of `user_files`.
pub fn file_tail(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::{Seek, SeekFrom};
    let (base, name) =
        split_base(path).ok_or_else(|| format!("{}: not a file path", path.display()))?;
    let (mut file, metadata) =
        open_checked(base, name, Owner::agent_itself()).map_err(|error| error.to_string())?;
    let explain = |error: std::io::Error| format!("{}: {error}", path.display());
    file.seek(SeekFrom::Start(metadata.len().saturating_sub(limit)))
        .map_err(explain)?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes).map_err(explain)?;
    Ok(bytes)
}

/// At most `limit` bytes of a file of the kernel or the agent (`/proc`,
/// the data dir).
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The checks, metrics and breaches the agent last saw, as JSON.
pub fn checks_json(snapshot: &HealthSnapshot) -> serde_json::Value {
    let checks: Vec<serde_json::Value> = snapshot
        .checks
        .values()
        .map(|check| {
            json!({
                "name": check.name,
                "kind": check.kind,
                "target": check.target,
                "critical": check.critical,
                "healthy": check.healthy,
                "last_passed": check.last_passed,
                "last_output": check.last_output,
                "last_run_at": check.last_run_at,
                "last_duration_ms": check.last_duration_ms,
                "consecutive": check.consecutive,
            })
        })
        .collect();
    json!({ "checks": checks, "metric_breaches": snapshot.metric_breaches })
}

/// `pid ppid state command` per process under `proc_root` (pure over the
/// files it reads; unreadable processes are skipped: they may have exited).
/// With `omit_command_lines`, the command is the kernel's short name in
/// brackets and no `cmdline` is read.
pub fn process_list(proc_root: &Path, omit_command_lines: bool) -> String {
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    let mut listing = String::from("PID PPID STATE COMMAND\n");
    for pid in pids.into_iter().take(MAX_PROCESSES) {
        if listing.len() >= MAX_PART_BYTES {
            break;
        }
        let directory = proc_root.join(pid.to_string());
        let Ok(stat) = read_bounded(&directory.join("stat"), MAX_STAT_BYTES) else {
            continue;
        };
        let stat = String::from_utf8_lossy(&stat);
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some((name_part, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = name_part.split_once('(').map_or("", |(_, name)| name);
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("?");
        let ppid = fields.next().unwrap_or("?");
        let command = if omit_command_lines {
            String::new()
        } else {
            read_bounded(&directory.join("cmdline"), MAX_COMMAND_LINE_BYTES)
                .map(|bytes| {
                    String::from_utf8_lossy(&bytes)
                        .split('\0')
                        .filter(|word| !word.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        };
        let shown = if command.is_empty() {
            format!("[{name}]")
        } else {
            command
        };
        listing.push_str(&format!("{pid} {ppid} {state} {shown}\n"));
    }
    listing
}

/// Kernel messages from `/dev/kmsg` (non-blocking: it ends where the ring
/// buffer does), or `dmesg`; an explanation if neither is readable.
fn kernel_messages() -> Vec<u8> {
    let from_kmsg = || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open("/dev/kmsg")?;
        let mut collected: Vec<u8> = Vec::new();
        let mut record = vec![0u8; 8192];
        loop {
            match file.read(&mut record) {
                Ok(0) => break,
                Ok(read) => {
                    collected.extend_from_slice(&record[..read]);
                    if collected.len() > 2 * KERNEL_MESSAGES_BYTES {
                        collected.drain(..collected.len() - KERNEL_MESSAGES_BYTES);
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                // A record overwritten while we read: skip to the next one.
                Err(error) if error.raw_os_error() == Some(nix::libc::EPIPE) => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(collected)
    };
    let kmsg_error = match from_kmsg() {
        Ok(bytes) if !bytes.is_empty() => return keep_newest(bytes),
        Ok(_) => "/dev/kmsg: empty".to_owned(),
        Err(error) => format!("/dev/kmsg: {error}"),
    };
    match std::process::Command::new("dmesg")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
    {
        Ok(output) if output.status.success() => keep_newest(output.stdout),
        Ok(output) => format!(
            "kernel messages not readable: {kmsg_error}; dmesg: {} {}\n",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into_bytes(),
        Err(error) => {
            format!("kernel messages not readable: {kmsg_error}; dmesg: {error}\n").into_bytes()
        }
    }
}

fn keep_newest(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() > KERNEL_MESSAGES_BYTES {
        bytes.drain(..bytes.len() - KERNEL_MESSAGES_BYTES);
    }
    bytes
}

fn read_or_explain(path: &Path) -> Vec<u8> {
    read_bounded(path, MAX_PART_BYTES as u64)
        .unwrap_or_else(|error| format!("{}: {error}\n", path.display()).into_bytes())
}

/// Collects every part; `about` describes the quarantine (first file).
pub fn collect(
    sources: &CollectionSources,
    snapshot: &HealthSnapshot,
    about: serde_json::Value,
) -> Vec<BundlePart> {
    let mut parts = vec![part(
        "quarantine.json",
        serde_json::to_vec_pretty(&about).unwrap_or_default(),
    )];
    parts.push(part(
        "checks.json",
        serde_json::to_vec_pretty(&checks_json(snapshot)).unwrap_or_default(),
    ));
    parts.push(part(
        "service.log",
        match &sources.service_log {
            Some(path) => file_tail(path, SERVICE_LOG_TAIL_BYTES)
                .unwrap_or_else(|error| format!("{error}\n").into_bytes()),
            None => b"the agent supervises no service on this machine\n".to_vec(),
        },
    ));
    parts.push(part(
        "processes.txt",
        process_list(&sources.proc_root, sources.omit_command_lines).into_bytes(),
    ));
    parts.push(part(
        "mounts.txt",
        read_or_explain(&sources.proc_root.join("self").join("mounts")),
    ));
    let metrics = crate::system::read_metrics(&sources.mounts);
    let disks: Vec<serde_json::Value> = metrics
        .disks
        .iter()
        .map(|disk| {
            json!({
                "mount": disk.mount,
                "total_bytes": disk.total_bytes,
                "used_bytes": disk.used_bytes,
                "available_bytes": disk.available_bytes,
            })
        })
        .collect();
    parts.push(part(
        "system.json",
        serde_json::to_vec_pretty(&json!({
            "disks": disks,
            "memory_total_bytes": metrics.memory_total_bytes,
            "memory_available_bytes": metrics.memory_available_bytes,
            "load": [metrics.load1, metrics.load5, metrics.load15],
            "uptime_seconds": metrics.uptime_seconds,
        }))
        .unwrap_or_default(),
    ));
    parts.push(part(
        "meminfo.txt",
        read_or_explain(&sources.proc_root.join("meminfo")),
    ));
    parts.push(part("kernel.txt", kernel_messages()));
    let layout = crate::image::layout::ImageLayout::new(&sources.data_dir);
    let journal = layout.journal_path();
    parts.push(part(
        "swap-journal.json",
        if journal.exists() {
            read_or_explain(&journal)
        } else {
            b"no swap in progress (no journal)\n".to_vec()
        },
    ));
    parts
}

/// The parts as one tar (plain, so that `tar tf` reads it anywhere).
pub fn to_tar(parts: &[BundlePart], mtime: u64) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for part in parts {
        let mut header = tar::Header::new_gnu();
        header.set_size(part.bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, &part.name, part.bytes.as_slice())?;
    }
    builder.into_inner()
}

/// Longest a hook may run before it is killed.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use flotte_proto::v1::CheckResult;

    #[test]
    fn a_bundle_holds_the_failing_check_output_and_the_log_tail() {
        let dir = std::env::temp_dir().join(format!("flotte-forensics-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("service.log");
        let mut text = "x".repeat(SERVICE_LOG_TAIL_BYTES as usize);
        text.push_str("\nlast words: out of memory\n");
        std::fs::write(&log, &text).unwrap();
        let mut snapshot = HealthSnapshot::default();
        snapshot.checks.insert(
            "web".into(),
            CheckResult {
                name: "web".into(),
                healthy: false,
                last_output: "connect 127.0.0.1:9: connection refused".into(),
                ..CheckResult::default()
            },
        );
        let sources = CollectionSources {
            data_dir: dir.clone(),
            service_log: Some(log),
            mounts: vec![PathBuf::from("/")],
            proc_root: PathBuf::from("/proc"),
            omit_command_lines: false,
        };
        let parts = collect(&sources, &snapshot, json!({"id": "q1"}));
        let names: Vec<&str> = parts.iter().map(|part| part.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "quarantine.json",
                "checks.json",
                "service.log",
                "processes.txt",
                "mounts.txt",
                "system.json",
                "meminfo.txt",
                "kernel.txt",
                "swap-journal.json"
            ]
        );
        let find = |name: &str| {
            String::from_utf8_lossy(&parts.iter().find(|part| part.name == name).unwrap().bytes)
                .into_owned()
        };
        assert!(find("checks.json").contains("connection refused"));
        let tail = find("service.log");
        assert_eq!(tail.len() as u64, SERVICE_LOG_TAIL_BYTES);
        assert!(tail.ends_with("last words: out of memory\n"));
        let own_pid = std::process::id().to_string();
        assert!(
            find("processes.txt")
                .lines()
                .any(|line| line.starts_with(&format!("{own_pid} "))),
            "this test's own process is listed"
        );
        assert!(find("mounts.txt").contains(" / "));
        assert!(!find("kernel.txt").is_empty());

        let tar_bytes = to_tar(&parts, 0).unwrap();
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        assert_eq!(archive.entries().unwrap().count(), parts.len());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_service_log_replaced_by_a_link_or_a_fifo_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("flotte-forensics-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "root:$6$secret-hash\n").unwrap();
        let log = dir.join("service.log");
        std::os::unix::fs::symlink(&secret, &log).unwrap();
        let refused = file_tail(&log, SERVICE_LOG_TAIL_BYTES).unwrap_err();
        assert!(refused.contains("symbolic link"), "{refused}");
        assert!(!refused.contains("secret-hash"));
        std::fs::remove_file(&log).unwrap();
        nix::unistd::mkfifo(&log, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let refused = file_tail(&log, SERVICE_LOG_TAIL_BYTES).unwrap_err();
        assert!(refused.contains("FIFO"), "{refused}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A `/proc` look-alike holding process 42 only.
    fn fake_proc_with_process_42(stat: &str, cmdline: &[u8]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("flotte-proc-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(root.join("42")).unwrap();
        std::fs::write(root.join("42/stat"), stat).unwrap();
        std::fs::write(root.join("42/cmdline"), cmdline).unwrap();
        root
    }

    #[test]
    fn huge_command_lines_are_cut_before_they_cost_memory() {
        let root = fake_proc_with_process_42("42 (big) S 1 42 42 0", &[b'a'; 1024 * 1024]);
        let listing = process_list(&root, false);
        let line = listing.lines().nth(1).unwrap();
        assert_eq!(
            line.len(),
            "42 1 S ".len() + MAX_COMMAND_LINE_BYTES as usize
        );
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn process_names_with_spaces_and_parentheses_parse() {
        let root = fake_proc_with_process_42("42 (my (odd) name) S 7 42 42 0", b"");
        std::fs::create_dir_all(root.join("self")).unwrap();
        let listing = process_list(&root, false);
        assert!(listing.contains("42 7 S [my (odd) name]"), "{listing}");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn command_lines_are_left_out_when_the_setting_asks() {
        let root =
            fake_proc_with_process_42("42 (secretive) S 1 42 42 0", b"tool\0--password\0hunter2\0");
        assert!(process_list(&root, false).contains("42 1 S tool --password hunter2"));
        let listing = process_list(&root, true);
        assert!(listing.contains("42 1 S [secretive]"), "{listing}");
        assert!(!listing.contains("hunter2"), "{listing}");
        let _ = std::fs::remove_dir_all(root);
    }
}
