//! Resource faults for real: an agent whose data dir is a small tmpfs the
//! test fills during each step of a swap, and a server whose SQLite data
//! dir fills up under calls; and a PostgreSQL the test started itself,
//! stopped for 30 s under load.
//!
//! Mounting a tmpfs needs root; without it these tests fail unless
//! `FLOTTE_TEST_SKIP_MOUNTS=1` asks to skip (PostgreSQL: see
//! `server/src/store/postgres/cluster.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flotte_tests::sample_fleet::{
    build_sample_image_on_port, free_port, trust_new_release_key, write_incompressible_tree,
};
use flotte_tests::{flottectl, http_get, test_runtime, wait_until, Agent, Server, TempDir};

#[allow(dead_code)]
#[path = "../../server/src/store/postgres/cluster.rs"]
mod cluster;

const PATIENCE: Duration = Duration::from_secs(90);

/// The environment variable that turns a missing mount into skipped tests.
const SKIP_VARIABLE: &str = "FLOTTE_TEST_SKIP_MOUNTS";

/// A tmpfs of `size_mib` MiB mounted by the test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// `None` when it cannot be mounted and [`SKIP_VARIABLE`] asks to skip.
    fn mount(path: &Path, size_mib: u64) -> Option<Self> {
        std::fs::create_dir_all(path).unwrap();
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output();
        match mounted {
            Ok(output) if output.status.success() => Some(SmallDisk {
                path: path.to_owned(),
            }),
            failed => {
                let reason = match failed {
                    Ok(output) => String::from_utf8_lossy(&output.stderr).into_owned(),
                    Err(error) => error.to_string(),
                };
                assert!(
                    std::env::var_os(SKIP_VARIABLE).is_some(),
                    "cannot mount a tmpfs (root needed): {reason}; set {SKIP_VARIABLE}=1 to skip"
                );
                eprintln!("skipped ({SKIP_VARIABLE} is set): {reason}");
                None
            }
        }
    }

    fn available_bytes(&self) -> u64 {
        let stats = nix::sys::statvfs::statvfs(&self.path).unwrap();
        stats.blocks_available() * stats.fragment_size()
    }

    fn filler(&self) -> PathBuf {
        self.path.join("filler")
    }

    /// Writes a file of real (not sparse) bytes until only `leave` bytes
    /// stay free, or the disk is full.
    fn fill_leaving(&self, leave: u64) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        while self.available_bytes() > leave {
            let wanted = (self.available_bytes() - leave).min(chunk.len() as u64);
            match file.write_all(&chunk[..usize::try_from(wanted).unwrap()]) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(error) => panic!("fill the disk: {error}"),
            }
        }
        let _ = file.sync_all();
    }

    fn free_everything(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a process still holding a file does not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn machine(server: &Server) -> serde_json::Value {
    server.ctl_json(&["machines", "show", "web-1"])
}

/// Waits until the machine's last swap status satisfies `condition`.
fn wait_for_swap(
    server: &Server,
    what: &str,
    condition: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut shown = serde_json::Value::Null;
    assert!(
        wait_until(PATIENCE, || {
            shown = machine(server);
            condition(&shown)
        }),
        "{what}: {shown:#}"
    );
    shown
}

/// The swap journal, if there is one, must be whole JSON.
fn assert_journal_consistent(agent: &Agent) {
    let path = agent.data_dir.join("images").join("swap-journal.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(&text);
        assert!(parsed.is_ok(), "the swap journal is torn: {text:?}");
    }
}

#[test]
fn a_full_disk_during_download_unpack_and_commit_keeps_the_running_image_and_the_swap_completes_once_space_is_back(
) {
    let root = TempDir::new("flotte-full-disk").unwrap();
    let Some(disk) = SmallDisk::mount(&root.path().join("disk"), 64) else {
        return;
    };
    let mut server =
        Server::init(root.path(), "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.start();
    let keys = trust_new_release_key(&server, root.path());
    let port = free_port().unwrap();
    // v2 and v3 carry 6 MiB that do not compress: a payload of ~6 MiB that
    // unpacks to another ~6 MiB.
    for version in ["1.0.0", "2.0.0", "3.0.0", "4.0.0"] {
        if version == "2.0.0" || version == "3.0.0" {
            write_incompressible_tree(
                &root.path().join(format!("tree-{version}/data")),
                6 << 20,
                6,
            )
            .unwrap();
        }
        let file = build_sample_image_on_port(&server, root.path(), &keys, version, port, "");
        server.ctl_ok(&["image", "push", file.to_str().unwrap()]);
    }
    let token = server.token("role=web", "dc1", &[]);
    // The agent's whole data dir is on the small disk; a 3 s soak leaves a
    // window between the health gate and the commit.
    let mut agent = Agent::new(&disk.path, "web-1", &server.address, &token).with_config(&format!(
        "[images]\nrelease_keys = [\"{}\"]\nverify_deadline = \"30s\"\nsoak = \"3s\"\nkeep = 2\n",
        keys.join("release.pub").display()
    ));
    agent.start();
    assert!(
        wait_until(PATIENCE, || server.connected_count() == 1),
        "{}",
        agent.log()
    );
    let serves = |version: &str| {
        http_get(&format!("127.0.0.1:{port}"), "/")
            .is_ok_and(|(_, body)| body.trim() == format!("v{version}"))
    };
    let committed = |version: &str| {
        let reference = format!("app@{version}");
        move |shown: &serde_json::Value| {
            shown["current_image"] == reference.as_str()
                && shown["last_swap"]["outcome"] == "committed"
        }
    };
    let disk_full_at = |step: &'static str| {
        move |shown: &serde_json::Value| {
            shown["last_swap"]["step"] == step
                && shown["last_swap"]["message"]
                    .as_str()
                    .is_some_and(|message| {
                        message.contains("is full") && message.contains("the disk holding")
                    })
        }
    };
    server.ctl_ok(&["machines", "set-image", "web-1", "app@1.0.0"]);
    wait_for_swap(&server, "v1 committed", committed("1.0.0"));

    // 1. The disk is full before the download starts.
    disk.fill_leaving(0);
    server.ctl_ok(&["machines", "set-image", "web-1", "app@2.0.0"]);
    let shown = wait_for_swap(
        &server,
        "a full disk named while downloading",
        disk_full_at("downloading"),
    );
    let message = shown["last_swap"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains(&agent.data_dir.display().to_string()),
        "{message}"
    );
    assert_eq!(shown["last_swap"]["outcome"], "in_progress");
    assert_eq!(shown["current_image"], "app@1.0.0");
    assert!(serves("1.0.0"), "the running image was touched");
    assert_journal_consistent(&agent);
    disk.free_everything();
    wait_for_swap(
        &server,
        "v2 committed once space is back",
        committed("2.0.0"),
    );
    assert!(serves("2.0.0"));

    // 2. Room for the payload but not for its unpacked tree.
    let payload_size = server.ctl_json(&["image", "show", "app@3.0.0"])["size"]
        .as_u64()
        .unwrap();
    disk.fill_leaving(payload_size + (2 << 20));
    server.ctl_ok(&["machines", "set-image", "web-1", "app@3.0.0"]);
    let shown = wait_for_swap(
        &server,
        "a full disk named while unpacking",
        disk_full_at("unpacking"),
    );
    assert_eq!(shown["last_swap"]["outcome"], "in_progress");
    assert_eq!(shown["current_image"], "app@2.0.0");
    assert!(serves("2.0.0"), "the running image was touched");
    assert_journal_consistent(&agent);
    disk.free_everything();
    wait_for_swap(
        &server,
        "v3 committed once space is back",
        committed("3.0.0"),
    );

    // 3. The disk fills while the new image proves itself: it keeps
    // running, and the commit waits for space.
    server.ctl_ok(&["machines", "set-image", "web-1", "app@4.0.0"]);
    wait_for_swap(&server, "v4 being verified", |shown| {
        shown["last_swap"]["step"] == "verifying"
    });
    disk.fill_leaving(0);
    let shown = wait_for_swap(
        &server,
        "a full disk named while committing",
        disk_full_at("committing"),
    );
    assert_eq!(shown["last_swap"]["outcome"], "in_progress");
    assert!(
        serves("4.0.0"),
        "the proven image was undone by a full disk"
    );
    assert_journal_consistent(&agent);
    disk.free_everything();
    wait_for_swap(
        &server,
        "v4 committed once space is back",
        committed("4.0.0"),
    );
    assert!(serves("4.0.0"));
    assert_eq!(machine(&server)["previous_image"], "app@3.0.0");
    agent.kill();
}

#[test]
fn a_full_server_disk_fails_calls_clearly_keeps_what_was_stored_and_recovers_when_space_returns() {
    let root = TempDir::new("flotte-full-server-disk").unwrap();
    let Some(disk) = SmallDisk::mount(&root.path().join("disk"), 32) else {
        return;
    };
    let mut server =
        Server::init(&disk.path, "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.start();
    let keys = trust_new_release_key(&server, root.path());
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start();
    assert!(
        wait_until(PATIENCE, || server.connected_count() == 1),
        "{}",
        agent.log()
    );
    server.ctl_ok(&["machines", "label", "web-1", "--set", "tier=gold"]);
    let port = free_port().unwrap();
    write_incompressible_tree(&root.path().join("tree-1.0.0/data"), 4 << 20, 4).unwrap();
    let image = build_sample_image_on_port(&server, root.path(), &keys, "1.0.0", port, "");

    disk.fill_leaving(0);
    let mut errors = Vec::new();
    for arguments in [
        vec!["machines", "label", "web-1", "--set", "tier=silver"],
        vec!["token", "create", "--labels", "role=db", "--zone", "dc1"],
        vec!["image", "push", image.to_str().unwrap()],
    ] {
        let output = server.ctl(&arguments);
        assert!(
            !output.status.success(),
            "{arguments:?} succeeded on a full disk"
        );
        errors.push((
            arguments.join(" "),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ));
    }
    eprintln!("observed: {errors:#?}");
    for (call, error) in &errors {
        assert!(
            error.contains("disk is full") || error.contains("full"),
            "{call}: {error}"
        );
    }
    // Reads still answer, and what was stored is whole.
    let shown = server.ctl_json(&["machines", "show", "web-1"]);
    assert_eq!(shown["labels"]["tier"], "gold");
    assert_eq!(server.ctl_json(&["image", "list"]), serde_json::json!([]));
    let incoming = server.data_dir.join("images").join("incoming");
    let half_written: Vec<_> = std::fs::read_dir(&incoming)
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    assert!(
        half_written.is_empty(),
        "a refused push left {half_written:?}"
    );
    assert!(
        server.process.as_mut().unwrap().is_running(),
        "the server died of a full disk"
    );

    disk.free_everything();
    server.ctl_ok(&["machines", "label", "web-1", "--set", "tier=silver"]);
    let pushed = server.ctl_json(&["image", "push", image.to_str().unwrap()]);
    assert_eq!(pushed[0]["version"], "1.0.0");
    assert_eq!(
        server.ctl_json(&["machines", "show", "web-1"])["labels"]["tier"],
        "silver"
    );
    // The audit chain is whole: the failed calls left no torn entry.
    let verified = server.ctl(&["audit", "verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    agent.kill();
}

#[test]
fn postgres_down_for_30_seconds_under_load_loses_no_acknowledged_change_and_says_why_meanwhile() {
    let Some(database) = cluster::private_cluster() else {
        return;
    };
    let url = test_runtime().block_on(database.fresh_database_url());
    let root = TempDir::new("flotte-postgres-outage").unwrap();
    let mut server = Server::init(root.path(), "server", &["--store-url", &url])
        .with_run_args(&["--report-interval", "1s"]);
    server.start();
    let mut agents: Vec<Agent> = ["web-1", "web-2", "web-3"]
        .iter()
        .map(|name| {
            let token = server.token("role=web", "dc1", &[]);
            let mut agent = Agent::new(root.path(), name, &server.address, &token);
            agent.start();
            agent
        })
        .collect();
    assert!(
        wait_until(PATIENCE, || server.connected_count() == 3),
        "{}",
        server.log()
    );

    // Load: relabels one after another, each acknowledged or refused.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = std::sync::Arc::clone(&stop);
        let profile = server.admin_profile();
        let address = server.address.clone();
        std::thread::spawn(move || {
            let mut outcomes: Vec<(u32, Result<(), String>)> = Vec::new();
            let mut attempt = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                attempt += 1;
                let label = format!("round={attempt}");
                let output = flottectl(
                    &profile,
                    &address,
                    &["machines", "label", "web-1", "--set", &label],
                );
                let outcome = if output.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&output.stderr).into_owned())
                };
                outcomes.push((attempt, outcome));
            }
            outcomes
        })
    };
    // Twenty acknowledged relabels before the outage.
    assert!(wait_until(PATIENCE, || server
        .ctl_json(&["machines", "show", "web-1"])["labels"]["round"]
        .as_str()
        .and_then(|round| round.parse::<u32>().ok())
        .is_some_and(|round| round >= 20)));

    database.stop();
    let stopped_at = Instant::now();
    // Meanwhile: a call that needs the database says so, and the server
    // stays up.
    let mut refusal = String::new();
    assert!(
        wait_until(PATIENCE, || {
            let output = server.ctl(&["machines", "label", "web-2", "--set", "tier=during"]);
            refusal = String::from_utf8_lossy(&output.stderr).into_owned();
            !output.status.success() && stopped_at.elapsed() >= Duration::from_secs(30)
        }),
        "{refusal}"
    );
    eprintln!("observed during the outage: {}", refusal.trim());
    assert!(
        refusal.contains(
            "the server's database is unavailable, nothing was changed; retry once it is back"
        ),
        "{refusal}"
    );
    assert!(
        server.process.as_mut().unwrap().is_running(),
        "the server died with its database"
    );
    database.start_again();
    let started_at = Instant::now();
    assert!(
        wait_until(PATIENCE, || server
            .ctl(&["machines", "label", "web-2", "--set", "tier=after"])
            .status
            .success()),
        "no write succeeded after PostgreSQL came back:\n{}",
        server.log()
    );
    eprintln!(
        "measured: PostgreSQL back → first write accepted after {:?}",
        started_at.elapsed()
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let outcomes = load.join().unwrap();

    // No acknowledged change is lost: the last acknowledged relabel is the
    // stored label, and each acknowledged one is in the audit log.
    let acknowledged: Vec<u32> = outcomes
        .iter()
        .filter(|(_, outcome)| outcome.is_ok())
        .map(|(attempt, _)| *attempt)
        .collect();
    let refused = outcomes.len() - acknowledged.len();
    eprintln!(
        "load: {} relabels, {} acknowledged, {refused} refused",
        outcomes.len(),
        acknowledged.len()
    );
    assert!(refused > 0, "the load never met the outage");
    let last = acknowledged.last().copied().unwrap();
    let shown = server.ctl_json(&["machines", "show", "web-1"]);
    assert_eq!(shown["labels"]["round"], last.to_string(), "{shown:#}");
    let audit = server.ctl_json(&["audit", "list"]);
    let audited: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| {
            entry["action"] == "machine.label"
                && entry["result"]
                    .as_str()
                    .is_some_and(|result| result.starts_with("ok"))
        })
        .map(|entry| entry["arguments"].to_string())
        .collect();
    for attempt in &acknowledged {
        let wanted = format!("\"round\":\"{attempt}\"");
        assert!(
            audited.iter().any(|arguments| arguments.contains(&wanted)),
            "acknowledged relabel {wanted} is not in the audit log"
        );
    }
    let verified = server.ctl(&["audit", "verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    // The agents are still (or again) connected and apply the new labels.
    assert!(wait_until(PATIENCE, || server.connected_count() == 3));
    assert!(wait_until(PATIENCE, || {
        let shown = server.ctl_json(&["machines", "show", "web-2"]);
        shown["labels"]["tier"] == "after"
            && shown["applied_desired_version"] == shown["desired_version"]
    }));
    for agent in &mut agents {
        agent.kill();
    }
}

/// libfaketime, which makes a process read the wall clock with an offset
/// taken from a file it re-reads on every call (Debian's `faketime`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The environment variable that turns a missing libfaketime into a skip.
const SKIP_FAKETIME_VARIABLE: &str = "FLOTTE_TEST_SKIP_FAKETIME";

#[test]
fn an_agent_clock_jumping_hours_forward_and_back_expires_what_expires_and_never_fails_closed_while_connected(
) {
    if !Path::new(LIBFAKETIME).exists() {
        assert!(
            std::env::var_os(SKIP_FAKETIME_VARIABLE).is_some(),
            "{LIBFAKETIME} is missing (install Debian's faketime); set {SKIP_FAKETIME_VARIABLE}=1 to skip"
        );
        return;
    }
    let root = TempDir::new("flotte-clock-skew").unwrap();
    let login = "flotteclock";
    flotte_tests::ensure_login(login);
    let mut server =
        Server::init(root.path(), "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.start();
    let keys_dir = root.path().join("keys");
    std::fs::create_dir_all(&keys_dir).unwrap();
    // The agent's clock: real time plus the offset in this file.
    let offset_file = root.path().join("agent-clock-offset");
    std::fs::write(&offset_file, "+0\n").unwrap();
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token).with_config(&format!(
        "[access]\nauthorized_keys_dir = \"{}\"\non_disconnect = \"fail-closed\"\nfail_closed_after = \"30m\"\n",
        keys_dir.display()
    ));
    agent.environment = vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        (
            "FAKETIME_TIMESTAMP_FILE".into(),
            offset_file.display().to_string(),
        ),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        // Timers and timeouts keep real time; only the wall clock moves.
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    agent.start();
    assert!(
        wait_until(PATIENCE, || server.connected_count() == 1),
        "{}",
        agent.log()
    );
    // alice: no expiry; bob: expires in an hour (real time).
    server.grant_new_user_on_web(root.path(), "alice", login, &[]);
    let in_an_hour =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    server.grant_new_user_on_web(root.path(), "bob", login, &["--expires", &in_an_hour]);
    let holds = |user: &str| {
        std::fs::read_to_string(keys_dir.join(login))
            .is_ok_and(|text| text.contains(&format!("flotte:user={user}")))
    };
    assert!(
        wait_until(PATIENCE, || holds("alice") && holds("bob")),
        "{}",
        agent.log()
    );

    // Two hours forward: bob's grant has expired by the agent's clock and
    // goes; alice's stays: the agent is connected, so the jump is not two
    // hours without contact (fail-closed is 30 min).
    std::fs::write(&offset_file, "+2h\n").unwrap();
    assert!(
        wait_until(PATIENCE, || !holds("bob")),
        "an expired grant stayed after the clock jumped forward:\n{}",
        agent.log()
    );
    assert!(
        holds("alice"),
        "the clock jump made the connected agent fail closed:\n{}",
        agent.log()
    );
    let seen = server.ctl_json(&["machines", "show", "web-1"])["last_seen"].clone();
    assert!(wait_until(PATIENCE, || server
        .ctl_json(&["machines", "show", "web-1"])["last_seen"]
        != seen));
    assert!(
        holds("alice"),
        "the connected agent failed closed after the jump:\n{}",
        agent.log()
    );

    // Back to real time: bob's grant is valid again by the agent's clock.
    std::fs::write(&offset_file, "+0\n").unwrap();
    assert!(
        wait_until(PATIENCE, || holds("bob") && holds("alice")),
        "{}",
        agent.log()
    );

    // Two hours back: the running session and the keys carry on.
    std::fs::write(&offset_file, "-2h\n").unwrap();
    let seen = server.ctl_json(&["machines", "show", "web-1"])["last_seen"].clone();
    assert!(
        wait_until(PATIENCE, || server.ctl_json(&["machines", "show", "web-1"])
            ["last_seen"]
            != seen),
        "the agent stopped reporting after its clock went back:\n{}",
        agent.log()
    );
    assert_eq!(
        server.ctl_json(&["machines", "show", "web-1"])["state"],
        "operational"
    );
    assert!(holds("alice") && holds("bob"), "{}", agent.log());
    agent.kill();
}
