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
    // The backup is encrypted to a key pair made away from the server.
    let identity = root.path().join("backup-identity.txt");
    let backup_key = || {
        Command::new(binary("flotte-server"))
            .arg("backup-key")
            .arg("--out")
            .arg(&identity)
            .output()
            .unwrap()
    };
    let key = backup_key();
    assert!(
        key.status.success(),
        "{}",
        String::from_utf8_lossy(&key.stderr)
    );
    assert!(
        !backup_key().status.success(),
        "backup-key must never overwrite a key"
    );
    let recipient = String::from_utf8(key.stdout).unwrap().trim().to_owned();
    assert!(recipient.starts_with("age1"), "{recipient}");
    let archive = root.path().join("server-backup.flotte-backup");
    let output = Command::new(binary("flotte-server"))
        .args(["backup", "--recipient", &recipient, "--data-dir"])
        .arg(&server.data_dir)
        .arg("--out")
        .arg(&archive)
        .output()
        .unwrap();
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
        &[
            "restore",
            "--identity",
            identity.to_str().unwrap(),
            "--from",
        ],
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
        &[
            "restore",
            "--identity",
            identity.to_str().unwrap(),
            "--from",
        ],
        &archive,
        "--data-dir",
        &restored_dir,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The admin's private key is not in the backup: the admin brings it.
    let admin_key = "admin/key.pem";
    assert!(!restored_dir.join(admin_key).exists());
    std::fs::copy(
        server.data_dir.join(admin_key),
        restored_dir.join(admin_key),
    )
    .unwrap();
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

#[test]
fn zone_loss_impact_and_single_points_of_failure_over_three_zones() {
    let root = TempDir::new("flotte-dr-impact").unwrap();
    let mut server =
        Server::init(root.path(), "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.append_config(
        "[[minimum]]\nlabel = \"role\"\nvalue = \"web\"\noperational = 2\n\n\
         [[minimum]]\nlabel = \"role\"\nvalue = \"db\"\noperational = 1\n",
    );
    server.start();
    let fleet = [
        ("web-1", "role=web", "dc1"),
        ("web-2", "role=web", "dc2"),
        ("web-3", "role=web", "dc3"),
        ("db-1", "role=db", "dc1"),
        ("db-2", "role=db", "dc1"),
    ];
    let _agents: Vec<Agent> = fleet
        .iter()
        .map(|(name, labels, zone)| {
            let token = server.token(labels, zone, &[]);
            let mut agent = Agent::new(root.path(), name, &server.address, &token);
            agent.start();
            agent
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(60), || server
            .machines()
            .iter()
            .filter(|machine| machine["state"] == "operational")
            .count()
            == fleet.len()),
        "{:?}",
        server.machines()
    );

    let row = |impact: &serde_json::Value, group: &str| -> (u64, u64, u64, u64, String) {
        let row = impact["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["group"] == group)
            .unwrap_or_else(|| panic!("no {group} in {impact}"))
            .clone();
        (
            row["machines_before"].as_u64().unwrap(),
            row["machines_after"].as_u64().unwrap(),
            row["operational_before"].as_u64().unwrap(),
            row["operational_after"].as_u64().unwrap(),
            row["state_after"].as_str().unwrap().to_owned(),
        )
    };
    let one_zone = server.ctl_json(&["dr", "impact", "--zone", "dc1", "--by", "role"]);
    assert_eq!(one_zone["lost_zones"], serde_json::json!(["dc1"]));
    assert_eq!(row(&one_zone, "web"), (3, 2, 3, 2, "operational".into()));
    assert_eq!(row(&one_zone, "db"), (2, 0, 2, 0, "down".into()));
    let two_zones = server.ctl_json(&[
        "dr", "impact", "--zone", "dc1", "--zone", "dc2", "--by", "role",
    ]);
    assert_eq!(row(&two_zones, "web"), (3, 1, 3, 1, "degraded".into()));
    let other = server.ctl_json(&["dr", "impact", "--zone", "dc3"]);
    assert_eq!(row(&other, "db"), (2, 2, 2, 2, "operational".into()));

    let table = server.ctl(&["dr", "impact", "--zone", "dc1"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("role=db") && text.contains("down"), "{text}");

    let report = server.ctl_json(&["dr", "report", "--by", "role"]);
    assert_eq!(
        report["single_points_of_failure"],
        serde_json::json!([{"group": "db", "zone": "dc1", "operational": 2, "machines": 2}])
    );

    // A zone no machine is in is a mistake worth naming.
    let unknown = server.ctl(&["dr", "impact", "--zone", "dc7"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no machine in zone \"dc7\""),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}
