//! End-to-end tests of the mistakes of a new user's first hour, each
//! answered by an error that names its cause: a second server or agent on a
//! data dir is refused naming the first one's pid (and the first keeps its
//! session), and a data dir the process cannot read is said to be a
//! permission problem — never "no CA", "not enrolled" or "not a data dir";
//! and the README's walk-through (`examples/first-rollout.sh`) reaches a
//! first rollout on two machines.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use flotte_tests::{binary, wait_until, Agent, Server, TempDir};

/// The unprivileged user a root test runs the binaries as (`nobody`).
const UNPRIVILEGED: u32 = 65_534;

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_second_server_or_agent_on_a_data_dir_is_refused_naming_the_first() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start_and_wait_for_session(&server);

    let second_server = Command::new(binary("flotte-server"))
        .arg("run")
        .arg("--data-dir")
        .arg(&server.data_dir)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let server_pid = server.process.as_ref().unwrap().pid().unwrap();
    assert!(
        !second_server.status.success()
            && stderr_of(&second_server).contains(&format!(
                "in use by another flotte-server (pid {server_pid})"
            )),
        "{}",
        stderr_of(&second_server)
    );

    let second_agent = Command::new(binary("flotte-agent"))
        .arg("run")
        .arg("--data-dir")
        .arg(&agent.data_dir)
        .args(["--server", &server.address, "--hostname", "web-1"])
        .output()
        .unwrap();
    let agent_pid = agent.process.as_ref().unwrap().pid().unwrap();
    assert!(
        !second_agent.status.success()
            && stderr_of(&second_agent)
                .contains(&format!("in use by another flotte-agent (pid {agent_pid})")),
        "{}",
        stderr_of(&second_agent)
    );
    // The first agent never lost its session to the second one.
    assert_eq!(server.connected_count(), 1);
    assert!(!agent.log().contains("newer session"), "{}", agent.log());

    // Once the first agent is gone, the data dir is free again.
    agent.kill();
    agent.start();
    assert!(
        wait_until(Duration::from_secs(30), || server.connected_count() == 1),
        "{}",
        agent.log()
    );
}

/// Runs a binary as a user who cannot read the data dirs: as root, the
/// unprivileged `nobody`; otherwise ourselves, after `unreadable` took
/// every right away from each data dir (root would read them anyway).
fn run_without_access(unreadable: &[&Path], program: &str, args: &[&str]) -> Output {
    let mut command = Command::new(binary(program));
    command.args(args);
    if nix::unistd::geteuid().is_root() {
        command.uid(UNPRIVILEGED).gid(UNPRIVILEGED);
    } else {
        for directory in unreadable {
            std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o000)).unwrap();
        }
    }
    let output = command.output().unwrap();
    for directory in unreadable {
        std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    output
}

fn assert_named_as_permission(output: &Output, misleading: &str) {
    let stderr = stderr_of(output);
    assert!(
        !output.status.success()
            && stderr.contains("Permission denied")
            && stderr.contains("not accessible to this process")
            && !stderr.contains(misleading),
        "{stderr}"
    );
}

#[test]
fn a_data_dir_this_process_cannot_read_is_named_as_a_permission_problem() {
    let root = TempDir::new("flotte-e2e").unwrap();
    // The data dirs sit in a directory everybody may traverse, so that only
    // the data dirs' own modes (0700, made by init and the agent) keep the
    // unprivileged user out.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start_and_wait_for_session(&server);
    agent.kill();
    assert_eq!(
        std::fs::metadata(&server.data_dir)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let data_dir = server.data_dir.to_str().unwrap();
    let agent_dir = agent.data_dir.to_str().unwrap();

    let second_listen = ["--listen", "127.0.0.1:0"];
    let mut run_args = vec!["run", "--data-dir", data_dir];
    run_args.extend(second_listen);
    let server_run = run_without_access(&[&server.data_dir], "flotte-server", &run_args);
    assert_named_as_permission(&server_run, "no CA");

    let agent_run = run_without_access(
        &[&agent.data_dir],
        "flotte-agent",
        &["run", "--data-dir", agent_dir, "--server", &server.address],
    );
    assert_named_as_permission(&agent_run, "not enrolled");

    let out = root.path().join("backup.tar");
    let key = Command::new(binary("flotte-server"))
        .arg("backup-key")
        .arg("--out")
        .arg(root.path().join("backup.key"))
        .output()
        .unwrap();
    assert!(key.status.success(), "{}", stderr_of(&key));
    let recipient = String::from_utf8_lossy(&key.stdout).trim().to_owned();
    let backup = run_without_access(
        &[&server.data_dir],
        "flotte-server",
        &[
            "backup",
            "--data-dir",
            data_dir,
            "--out",
            out.to_str().unwrap(),
            "--recipient",
            &recipient,
        ],
    );
    assert_named_as_permission(&backup, "not a server data dir");
}

/// The workspace's root (where README.md and examples/ are).
fn workspace_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn the_readme_walk_through_reaches_a_first_rollout_on_two_machines() {
    let root = TempDir::new("flotte-e2e").unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The binaries on PATH, as the README puts them.
    let binaries = binary("flottectl").parent().unwrap().to_path_buf();
    for name in ["flotte-server", "flotte-agent"] {
        assert!(binary(name).exists(), "{name} is built");
    }
    let path = format!(
        "{}:{}",
        binaries.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let walk = root.path().join("walk");
    let output = Command::new("sh")
        .arg(workspace_root().join("examples/first-rollout.sh"))
        .arg(&walk)
        .env("PATH", path)
        .output()
        .unwrap();
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        stderr_of(&output)
    );
    let logs: String = ["server.log", "web-1.log", "web-2.log"]
        .iter()
        .map(|log| {
            format!(
                "\n--- {log}\n{}",
                std::fs::read_to_string(walk.join(log)).unwrap_or_default()
            )
        })
        .collect();
    assert!(output.status.success(), "{said}{logs}");
    // The rollout's watch ended on success, and the wide listing shows both
    // machines on the new version.
    assert!(said.contains("succeeded"), "{said}");
    let on_new_version: Vec<&str> = said
        .lines()
        .filter(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            columns.get(1).is_some_and(|host| host.starts_with("web-"))
                && columns.get(9) == Some(&"app@1.1.0")
        })
        .collect();
    assert_eq!(on_new_version.len(), 2, "{said}");
}
