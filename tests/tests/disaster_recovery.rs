//! End-to-end tests of disaster recovery with the real binaries: a backup
//! taken while agents are connected, restored into a new data dir, serves the
//! same agents (they reconnect with their identities, no re-enrollment); and
//! `flottectl dr impact` / `dr report` over a three-zone fleet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use flotte_tests::{binary, wait_until, Agent, Server, TempDir};

fn connected_ids(server: &Server) -> Vec<String> {
    let mut ids: Vec<String> = server
        .machines()
        .into_iter()
        .filter(|machine| machine["connected"] == true)
        .map(|machine| machine["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// `flotte-server FIRST… PATH1 FLAG PATH2` (paths need not be UTF-8).
fn flotte_server_command(
    first: &[&str],
    path1: &std::path::Path,
    flag: &str,
    path2: &std::path::Path,
) -> std::process::Output {
    Command::new(binary("flotte-server"))
        .args(first)
        .arg(path1)
        .arg(flag)
        .arg(path2)
        .output()
        .unwrap()
}

#[test]
fn a_backup_taken_while_agents_are_connected_restores_a_server_they_reconnect_to() {
    let root = TempDir::new("flotte-dr-backup").unwrap();
    let mut server =
        Server::init(root.path(), "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.start();
    let mut agents: Vec<Agent> = [("web-1", "dc1"), ("web-2", "dc2")]
        .into_iter()
        .map(|(name, zone)| {
            let token = server.token("role=web", zone, &[]);
            let mut agent = Agent::new(root.path(), name, &server.address, &token);
            agent.start();
            agent
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(60), || server.connected_count() == 2),
        "{}",
        server.log()
    );
    let ids_before = connected_ids(&server);

    // The backup runs against the live data dir, with the store open and agents connected.
    let archive = root.path().join("server-backup.tar.zst");
    let output = flotte_server_command(
        &["backup", "--data-dir"],
        &server.data_dir,
        "--out",
        &archive,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A token created after the backup is not in it.
    let after_backup = server.ctl_json(&["token", "create", "--zone", "dc9"]);
    let late_token_id = after_backup["id"].as_str().unwrap().to_owned();

    let address = server.address.clone();
    server.terminate(Duration::from_secs(10));

    // Restoring over a data dir that is in use is refused.
    let refused = flotte_server_command(
        &["restore", "--from"],
        &archive,
        "--data-dir",
        &server.data_dir,
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let restored_dir = root.path().join("restored");
    let output = flotte_server_command(
        &["restore", "--from"],
        &archive,
        "--data-dir",
        &restored_dir,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The old data dir is gone for good: the restored one is all there is.
    std::fs::remove_dir_all(&server.data_dir).unwrap();

    let mut restored = Server::existing(restored_dir, &address, &["--report-interval", "1s"]);
    restored.start();
    assert!(
        wait_until(Duration::from_secs(60), || connected_ids(&restored)
            == ids_before),
        "agents did not reconnect with their identities: {:?} vs {:?}\n{}",
        restored.machines(),
        ids_before,
        restored.log()
    );
    assert_eq!(restored.machines().len(), 2, "no machine enrolled anew");
    for agent in &agents {
        let log = agent.log();
        assert_eq!(log.matches(": enrolled").count(), 1, "{log}");
        assert!(!log.contains("re-enrolled"), "{log}");
    }
    let tokens = restored.ctl_json(&["token", "list"]);
    assert!(
        !tokens
            .as_array()
            .unwrap()
            .iter()
            .any(|token| token["id"] == late_token_id.as_str()),
        "{tokens}"
    );
    // The admin profile of the old server still works (same CA, same operators).
    assert_eq!(restored.ctl_json(&["audit", "verify"])["intact"], true);
    for agent in &mut agents {
        agent.terminate(Duration::from_secs(10));
    }
}
