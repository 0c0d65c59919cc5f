//! End to end on PostgreSQL: `flotte-server init --store-url` records the
//! first admin in a PostgreSQL database and writes `[store] kind =
//! "postgres"`; the real server binary then serves from that database: an
//! agent enrolls, and survives a server restart with its machine kept
//! there (not in a SQLite file). The database lives in a throwaway cluster
//! these tests start themselves (the same harness as the store's contract
//! suite). A backup of such a data dir holds a `pg_dump` of the database
//! (forensic bundles included) and restores into another one.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The store's own test harness, shared rather than copied; this test uses
// only part of it.
#[allow(dead_code)]
#[path = "../../server/src/store/postgres/cluster.rs"]
mod cluster;

use std::time::Duration;

use flotte_tests::{test_runtime, wait_for_forensic_bundle, wait_until, Agent, Server, TempDir};

const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// The hostnames of the machines stored in the database at `url`, read
/// directly with the driver (not through the server).
async fn stored_hostnames(url: &str, password: &str) -> Vec<String> {
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    config.password(password);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to the server's database");
    let connection = tokio::spawn(connection);
    let rows = client
        .query("SELECT hostname FROM machines ORDER BY hostname", &[])
        .await
        .expect("read the machines table");
    drop(client);
    let _ = connection.await;
    rows.iter().map(|row| row.get(0)).collect()
}

#[test]
fn a_server_on_postgres_enrolls_an_agent_and_keeps_it_across_a_restart() {
    let runtime = test_runtime();
    let password = "e2e-password";
    let Some(url) = runtime.block_on(cluster::password_role_url(password)) else {
        return;
    };
    let root = TempDir::new("flotte-postgres").unwrap();
    let password_file = root.path().join("postgres.password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let mut server = Server::init(
        root.path(),
        "server",
        &[
            "--store-url",
            &url,
            "--store-password-file",
            password_file.to_str().unwrap(),
        ],
    );
    let settings = std::fs::read_to_string(server.data_dir.join("server.toml")).unwrap();
    assert!(
        settings.contains("[store]") && settings.contains("kind = \"postgres\""),
        "{settings}"
    );
    assert!(!settings.contains(password), "{settings}");
    server.start();

    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start();
    assert!(
        wait_until(ENROLL_TIMEOUT, || server.connected_count() == 1),
        "agent log:\n{}\nserver log:\n{}",
        agent.log(),
        server.log()
    );
    assert!(
        !server.data_dir.join("flotte.db").exists(),
        "a SQLite store was created next to the PostgreSQL one"
    );
    assert!(!server.log().contains(password), "{}", server.log());
    let hostnames = runtime.block_on(stored_hostnames(&url, password));
    assert_eq!(hostnames.len(), 1, "{hostnames:?}");

    // Restarted, the server finds the machine in PostgreSQL and the agent
    // comes back by itself.
    server.kill();
    server.start();
    assert!(
        wait_until(ENROLL_TIMEOUT, || server.connected_count() == 1),
        "agent log:\n{}\nserver log:\n{}",
        agent.log(),
        server.log()
    );
    assert_eq!(server.machines().len(), 1);
}

/// Runs `flotte-server ARGS…` and returns its stdout; panics with stderr.
fn flotte_server(args: &[&std::ffi::OsStr]) -> String {
    let output = std::process::Command::new(flotte_tests::binary("flotte-server"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "flotte-server {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn a_backup_of_a_postgres_data_dir_restores_into_another_database_the_agent_returns_to() {
    let runtime = test_runtime();
    let Some(url) = runtime.block_on(cluster::fresh_database_url()) else {
        return;
    };
    let restored_url = runtime.block_on(cluster::fresh_database_url()).unwrap();
    let root = TempDir::new("flotte-postgres-backup").unwrap();
    let mut server = Server::init(root.path(), "server", &["--store-url", &url]);
    server.start();
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start();
    assert!(
        wait_until(ENROLL_TIMEOUT, || server.connected_count() == 1),
        "{}",
        agent.log()
    );
    server.ctl_json(&["machines", "label", "web-1", "--set", "tier=gold"]);
    // A forensic bundle, kept in the database: the backup carries it.
    server.ctl_json(&["machines", "quarantine", "web-1", "--reason", "suspect"]);
    let bundle_out = root.path().join("forensics");
    let download_bundle = |server: &Server| {
        wait_for_forensic_bundle(
            &server.admin_profile(),
            &server.address,
            "web-1",
            &bundle_out,
            ENROLL_TIMEOUT,
        )
    };
    let bundle = download_bundle(&server);

    let identity = root.path().join("backup.key");
    let recipient = flotte_server(&[
        "backup-key".as_ref(),
        "--out".as_ref(),
        identity.as_os_str(),
    ]);
    let archive = root.path().join("server.flotte-backup");
    flotte_server(&[
        "backup".as_ref(),
        "--recipient".as_ref(),
        recipient.trim().as_ref(),
        "--data-dir".as_ref(),
        server.data_dir.as_os_str(),
        "--out".as_ref(),
        archive.as_os_str(),
    ]);
    // Without a database to restore into, restore says what it needs.
    let restored_dir = root.path().join("restored");
    let refused = std::process::Command::new(flotte_tests::binary("flotte-server"))
        .arg("restore")
        .arg("--from")
        .arg(&archive)
        .arg("--identity")
        .arg(&identity)
        .arg("--data-dir")
        .arg(&restored_dir)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--store-url"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    flotte_server(&[
        "restore".as_ref(),
        "--from".as_ref(),
        archive.as_os_str(),
        "--identity".as_ref(),
        identity.as_os_str(),
        "--data-dir".as_ref(),
        restored_dir.as_os_str(),
        "--store-url".as_ref(),
        restored_url.as_ref(),
    ]);
    let settings = std::fs::read_to_string(restored_dir.join("server.toml")).unwrap();
    assert!(settings.contains(&restored_url), "{settings}");
    assert!(!restored_dir.join("flotte.pgdump").exists());

    // The old server and its database are gone; the restored one serves
    // from the other database, and the agent comes back to it.
    let address = server.address.clone();
    server.kill();
    // The admin's private key is never in a backup: the admin brings it.
    std::fs::copy(
        server.admin_profile().join("key.pem"),
        restored_dir.join("admin").join("key.pem"),
    )
    .unwrap();
    let mut restored = Server::existing(restored_dir, &address, &[]);
    restored.start();
    assert!(
        wait_until(ENROLL_TIMEOUT, || restored.connected_count() == 1),
        "agent log:\n{}\nrestored server log:\n{}",
        agent.log(),
        restored.log()
    );
    let machines = restored.machines();
    assert_eq!(machines[0]["labels"]["tier"], "gold", "{machines:#?}");
    let restored_bundle = download_bundle(&restored);
    assert_eq!(
        restored_bundle["sha256"], bundle["sha256"],
        "{restored_bundle:#}"
    );
    assert_eq!(restored_bundle["quarantine_id"], bundle["quarantine_id"]);
}
