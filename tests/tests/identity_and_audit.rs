//! End-to-end tests of identity and audit: operator roles checked on every
//! admin RPC, revocation that refuses an identity at once and cuts its open
//! streams, machine decommissioning, trusted release keys, and the
//! hash-chained audit log — with the real binaries and the real store.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use flotte_common::profile::Profile;
use flotte_proto::v1::tokens_client::TokensClient;
use flotte_proto::v1::CreateTokenRequest;
use flotte_tests::{channel_as, flottectl, test_runtime, wait_until, Agent, Server, TempDir};

/// What the issue promises: revocation closes open streams within a second.
const CUT_WITHIN: Duration = Duration::from_secs(1);

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs flottectl with `profile` and expects it to fail with `expected` in stderr.
fn refused(server: &Server, profile: &Path, args: &[&str], expected: &str) {
    let output = flottectl(profile, &server.address, args);
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "{args:?} should fail: {stderr}");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr}"
    );
}

fn succeeds(server: &Server, profile: &Path, args: &[&str]) -> String {
    let output = flottectl(profile, &server.address, args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        stderr_of(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A started server in `root`, with its admin profile.
fn started_server(root: &TempDir) -> Server {
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    server
}

/// `Tokens.CreateToken` called directly (not through flottectl) with a profile.
fn create_token_as(profile: &Path, address: &str) -> Result<(), tonic::Status> {
    test_runtime().block_on(async {
        TokensClient::new(channel_as(profile, address))
            .create_token(CreateTokenRequest {
                labels: Default::default(),
                zone: "dc1".into(),
                ttl_seconds: 60,
                uses: 1,
            })
            .await
            .map(|_| ())
    })
}

fn audit_entries(server: &Server, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["audit", "list"];
    args.extend(extra);
    server.ctl_json(&args).as_array().cloned().unwrap()
}

#[test]
fn roles_are_checked_on_every_admin_rpc_and_refusals_name_the_role_needed() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let server = started_server(&root);
    let viewer = server.create_operator(root.path(), "bob", "viewer");
    let operator = server.create_operator(root.path(), "carol", "operator");
    let key_mode = std::fs::metadata(viewer.join("key.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600
    );

    // A viewer reads, and nothing more.
    succeeds(&server, &viewer, &["machines", "list"]);
    succeeds(&server, &viewer, &["operator", "list"]);
    let status = create_token_as(&viewer, &server.address).unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("needs role admin") && status.message().contains("bob"),
        "{status:?}"
    );
    refused(
        &server,
        &viewer,
        &["token", "create", "--zone", "dc1"],
        "needs role admin",
    );
    refused(
        &server,
        &viewer,
        &["machines", "label", "web-1", "--set", "a=b"],
        "needs role operator",
    );

    // An operator changes the fleet but does not manage trust.
    refused(
        &server,
        &operator,
        &["machines", "label", "web-1", "--set", "a=b"],
        "no machine matches",
    );
    refused(
        &server,
        &operator,
        &[
            "operator",
            "create",
            "dave",
            "--role",
            "viewer",
            "--out",
            "/nonexistent/dave",
        ],
        "needs role admin",
    );
    let status = create_token_as(&operator, &server.address).unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // A certificate from our CA for an operator the store does not know.
    let ca = flotte_server::ca::CertificateAuthority::load(&server.data_dir).unwrap();
    let identity = flotte_proto::identity::Identity::operator("flotte.local", "mallory");
    let (certificate, key) = ca
        .issue_client_with_new_key(&identity, Duration::from_secs(600))
        .unwrap();
    let stranger = root.path().join("mallory");
    Profile {
        certificate_pem: certificate.certificate_pem,
        key_pem: key.serialize_pem(),
        ..Profile::load(&viewer).unwrap()
    }
    .write(&stranger)
    .unwrap();
    refused(
        &server,
        &stranger,
        &["machines", "list"],
        "operator mallory is not known to this server",
    );

    // A new role takes effect on the next call, without a new certificate.
    server.ctl_json(&["operator", "set-role", "bob", "operator"]);
    refused(
        &server,
        &viewer,
        &["machines", "label", "web-1", "--set", "a=b"],
        "no machine matches",
    );
    // The last admin cannot be demoted or revoked.
    refused(
        &server,
        &server.admin_profile(),
        &["operator", "set-role", "admin", "viewer"],
        "last admin",
    );

    // Refused mutating calls are in the audit log, with the caller's role.
    let entries = audit_entries(&server, &["--actor", "bob"]);
    let denied_token = entries
        .iter()
        .find(|entry| entry["action"] == "token.create")
        .expect("bob's refused token.create is audited");
    assert_eq!(denied_token["role"], "viewer");
    assert!(denied_token["result"]
        .as_str()
        .unwrap()
        .starts_with("denied: "));
    let listed = server.ctl_json(&["operator", "list"]);
    let roles: Vec<(String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|operator| {
            (
                operator["name"].as_str().unwrap().to_owned(),
                operator["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [
            ("admin", "admin"),
            ("bob", "operator"),
            ("carol", "operator")
        ]
        .map(|(name, role)| (name.to_owned(), role.to_owned()))
    );
}

#[test]
fn an_operator_key_made_on_their_own_machine_never_reaches_the_server() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let server = started_server(&root);
    let (key_pem, csr_pem) = flotte_common::key_request::generate_key_and_csr().unwrap();
    let csr_file = root.path().join("erin.csr");
    std::fs::write(&csr_file, csr_pem).unwrap();
    let profile = root.path().join("erin");
    succeeds(
        &server,
        &server.admin_profile(),
        &[
            "operator",
            "create",
            "erin",
            "--role",
            "viewer",
            "--csr",
            csr_file.to_str().unwrap(),
            "--out",
            profile.to_str().unwrap(),
        ],
    );
    assert!(!profile.join("key.pem").exists());
    std::fs::write(profile.join("key.pem"), key_pem).unwrap();
    succeeds(&server, &profile, &["machines", "list"]);
    // A second operator of the same name is refused.
    refused(
        &server,
        &server.admin_profile(),
        &[
            "operator",
            "create",
            "erin",
            "--role",
            "admin",
            "--out",
            root.path().join("erin2").to_str().unwrap(),
        ],
        "already exists",
    );
}

#[test]
fn a_revoked_operator_is_refused_and_its_open_watch_stream_is_cut() {
    use flotte_proto::v1::machines_client::MachinesClient;
    use flotte_proto::v1::WatchMachinesRequest;

    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = started_server(&root);
    let bob = server.create_operator(root.path(), "bob", "admin");
    succeeds(&server, &bob, &["machines", "list"]);

    // Bob holds a `machines watch` stream open.
    let runtime = test_runtime();
    let (ended_sender, ended) = tokio::sync::oneshot::channel();
    runtime.block_on(async {
        let mut events = MachinesClient::new(channel_as(&bob, &server.address))
            .watch(WatchMachinesRequest::default())
            .await
            .unwrap()
            .into_inner();
        tokio::spawn(async move {
            // No machine: the stream stays silent until it is cut.
            let outcome = events.message().await;
            let _ = ended_sender.send((Instant::now(), format!("{outcome:?}")));
        });
    });

    succeeds(
        &server,
        &server.admin_profile(),
        &["operator", "revoke", "bob"],
    );
    let revoked_at = Instant::now();
    let (ended_at, outcome) = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), ended).await })
        .expect("bob's stream was not cut within 5 s")
        .unwrap();
    let cut_after = ended_at.saturating_duration_since(revoked_at);
    eprintln!(
        "measured: revoke answered → bob's open watch stream cut after {cut_after:?} ({outcome})"
    );
    assert!(cut_after < CUT_WITHIN, "stream cut after {cut_after:?}");

    // The next call fails, at the handshake, naming the revocation.
    refused(&server, &bob, &["machines", "list"], "it was revoked");
    assert!(server
        .log()
        .contains("revoked certificate refused at the handshake"));
    let listed = server.ctl_json(&["operator", "list"]);
    let bob_listed = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|operator| operator["name"] == "bob")
        .unwrap()
        .clone();
    assert!(bob_listed["revoked_at"].is_string(), "{bob_listed}");
    // Revoked names are not reused.
    refused(
        &server,
        &server.admin_profile(),
        &[
            "operator",
            "create",
            "bob",
            "--role",
            "viewer",
            "--out",
            root.path().join("bob2").to_str().unwrap(),
        ],
        "already exists",
    );
    // The deny list is durable: still refused after a restart.
    server.kill();
    server.start();
    refused(&server, &bob, &["machines", "list"], "it was revoked");
}

/// Waits for a decommissioned machine's agent to exit by itself with status
/// 2 (the one its systemd unit does not restart).
fn assert_stops_for_good(agent: &mut Agent) {
    let status = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|status| status.code()),
        Some(2),
        "{}",
        agent.log()
    );
}

#[test]
fn a_decommissioned_machine_is_cut_within_a_second_and_its_reconnect_refused() {
    let root = TempDir::new("flotte-e2e").unwrap();
    // Both log as JSON here (what the assertions below read is the same
    // text, inside the `message` field).
    let mut server =
        Server::init(root.path(), "server", &[]).with_run_args(&["--log-format", "json"]);
    server.start();
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token)
        .with_arguments(&["--log-format", "json"]);
    agent.start();
    assert!(
        wait_until(Duration::from_secs(30), || server.connected_count() == 1),
        "{}",
        agent.log()
    );

    let asked_at = Instant::now();
    let decommissioned = server.ctl_json(&["machines", "decommission", "web-1"]);
    let answered_at = Instant::now();
    assert!(decommissioned["retired_at"].is_string(), "{decommissioned}");
    // The agent hears why on its session, which the server then closes.
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .log()
            .contains("was decommissioned by admin")),
        "{}",
        agent.log()
    );
    let told_after = answered_at.elapsed();
    assert!(
        wait_until(Duration::from_secs(5), || server.connected_count() == 0),
        "{}",
        server.log()
    );
    let cut_after = answered_at.elapsed();
    eprintln!(
        "measured: flottectl decommission took {:?}; after its answer the agent had logged the reason within {told_after:?}, and the machine was listed disconnected within {cut_after:?}",
        answered_at - asked_at
    );
    assert!(told_after < CUT_WITHIN, "agent told after {told_after:?}");
    assert!(
        cut_after < CUT_WITHIN + Duration::from_millis(500),
        "cut after {cut_after:?}"
    );

    // The agent stops for good, saying why, with the status systemd's unit
    // does not restart (2); it never tried to reconnect.
    assert_stops_for_good(&mut agent);
    assert!(
        agent
            .log()
            .contains("stopping: this machine was decommissioned"),
        "{}",
        agent.log()
    );
    let refusals = || {
        server
            .log()
            .matches("revoked certificate refused at the handshake")
            .count()
    };
    assert_eq!(refusals(), 0, "the stopped agent never dialled again");
    // Started again by hand, its handshake is refused (one refusal in the
    // server's log), it names the revocation and stops again.
    agent.start();
    assert_stops_for_good(&mut agent);
    assert!(
        agent
            .log()
            .contains("the server refused our client certificate: it was revoked"),
        "{}",
        agent.log()
    );
    assert_eq!(refusals(), 1, "{}", server.log());
    assert_eq!(server.connected_count(), 0, "{}", agent.log());
    let shown = server.ctl_json(&["machines", "show", "web-1"]);
    assert_eq!(shown["connected"], false);
    assert!(shown["retired_at"].is_string());
    assert_eq!(shown["state"], "retired", "{shown}");
    assert!(
        shown["transitions"]
            .as_array()
            .is_some_and(|transitions| transitions[0]["to"] == "retired"),
        "{shown}"
    );
    let again = server.ctl(&["machines", "decommission", "web-1"]);
    assert!(stderr_of(&again).contains("already decommissioned"));
    for (who, log) in [("server", server.log()), ("agent", agent.log())] {
        let events: Vec<serde_json::Value> = log
            .lines()
            .filter(|line| line.starts_with('{'))
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|error| panic!("{who}: {error}: {line}"))
            })
            .collect();
        assert!(events.len() > 3, "{who}: {log}");
        for event in &events {
            assert!(
                event["timestamp"].is_string()
                    && event["level"].is_string()
                    && event["target"].is_string()
                    && event["fields"]["message"].is_string(),
                "{who}: {event}"
            );
        }
    }
    assert!(
        server.log().lines().all(|line| line.starts_with('{')),
        "every server line is JSON: {}",
        server.log()
    );
    let relabel = server.ctl(&["machines", "label", "web-1", "--set", "a=b"]);
    assert!(stderr_of(&relabel).contains("was decommissioned"));
}

#[test]
fn release_keys_are_validated_listed_and_removed_by_admins_only() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let server = started_server(&root);
    let viewer = server.create_operator(root.path(), "bob", "viewer");
    let key = flotte_proto::release_keys::ReleasePublicKey {
        key: [42u8; 32],
        comment: String::new(),
    };
    let files = root.path().join("keys");
    std::fs::create_dir_all(&files).unwrap();
    let write = |name: &str, text: String| {
        let path = files.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let openssh = write(
        "release.pub",
        format!("{} release@ci\n", key.openssh_line()),
    );
    let hex = write("laptop.hex", hex_of(&[7u8; 32]));
    let private = write(
        "id_ed25519",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n".into(),
    );
    let rsa = write(
        "id_rsa.pub",
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== me\n".into(),
    );

    let added = server.ctl_json(&["image", "trust", "add", &openssh]);
    assert_eq!(added[0]["name"], "release@ci");
    assert_eq!(added[0]["public_key_base64"], key.base64());
    server.ctl_json(&["image", "trust", "add", &hex, "--name", "laptop"]);
    refused(
        &server,
        &server.admin_profile(),
        &["image", "trust", "add", &openssh],
        "already exists",
    );
    refused(
        &server,
        &server.admin_profile(),
        &["image", "trust", "add", &private],
        "private key",
    );
    refused(
        &server,
        &server.admin_profile(),
        &["image", "trust", "add", &rsa],
        "unsupported key type",
    );
    refused(
        &server,
        &viewer,
        &["image", "trust", "add", &hex],
        "needs role admin",
    );
    let listed = flottectl(
        &viewer,
        &server.address,
        &["image", "trust", "list", "-o", "json"],
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["release@ci", "laptop"]);
    assert!(listed[0]["openssh"]
        .as_str()
        .unwrap()
        .starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"));

    server.ctl_json(&["image", "trust", "remove", "laptop"]);
    let remaining = server.ctl_json(&["image", "trust", "list"]);
    assert_eq!(remaining.as_array().unwrap().len(), 1);
    let actions: Vec<String> = audit_entries(&server, &[])
        .iter()
        .map(|entry| {
            format!(
                "{} {}",
                entry["action"].as_str().unwrap(),
                entry["result"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        actions
            .iter()
            .any(|action| action.starts_with("release-key.add ok: key")),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|action| action.starts_with("release-key.remove ok")),
        "{actions:?}"
    );
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[test]
fn audit_verify_passes_untouched_and_names_edited_and_deleted_entries() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let server = started_server(&root);
    let secret = server.token("role=web", "dc1", &[]);
    server.token("role=db", "dc2", &["--uses", "3"]);
    server.create_operator(root.path(), "bob", "viewer");
    let _ = server.ctl(&["machines", "label", "nowhere", "--set", "a=b"]);

    let entries = audit_entries(&server, &[]);
    let summary: Vec<String> = entries
        .iter()
        .map(|entry| {
            format!(
                "{} {} {}",
                entry["seq"],
                entry["actor"].as_str().unwrap(),
                entry["action"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            "1 flotte-server init operator.create",
            "2 admin token.create",
            "3 admin token.create",
            "4 admin operator.create",
            "5 admin machine.label",
        ]
    );
    assert_eq!(entries[1]["arguments"]["zone"], "dc1");
    assert!(entries[4]["result"]
        .as_str()
        .unwrap()
        .starts_with("failed: NotFound"));
    let everything = serde_json::to_string(&entries).unwrap();
    let token_secret = secret.split('.').nth(2).unwrap();
    assert!(
        !everything.contains(token_secret),
        "a token secret reached the audit log"
    );
    assert_eq!(audit_entries(&server, &["--actor", "admin"]).len(), 4);
    assert_eq!(audit_entries(&server, &["--since", "1h"]).len(), 5);

    let verify = |expected_success: bool, expected: &str| {
        let output = server.ctl(&["audit", "verify"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            stderr_of(&output)
        );
        assert_eq!(output.status.success(), expected_success, "{text}");
        assert!(text.contains(expected), "expected {expected:?} in {text}");
    };
    verify(true, "audit log intact: 5 entries");

    // Edit one field of entry 3 behind the server's back, then undo it.
    let database = rusqlite::Connection::open(flotte_server::store_path(&server.data_dir)).unwrap();
    database
        .execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 3", [])
        .unwrap();
    verify(false, "audit log broken at entry 3");
    verify(false, "edited");
    database
        .execute("UPDATE audit_log SET actor = 'admin' WHERE seq = 3", [])
        .unwrap();
    verify(true, "intact");

    // Delete entry 2.
    database
        .execute("DELETE FROM audit_log WHERE seq = 2", [])
        .unwrap();
    verify(false, "audit log broken at entry 3");
    verify(false, "deleted or reordered");
}

/// Recomputes `seq`, `previous_hash` and `hash` of every entry in the
/// SQLite store, in order, as someone who can write the database would
/// after editing or deleting entries (so the chain alone looks intact).
fn rewrite_chain(database: &rusqlite::Connection) {
    let mut statement = database
        .prepare("SELECT seq, at, actor, role, action, arguments_json, result FROM audit_log ORDER BY seq")
        .unwrap();
    let rows: Vec<(i64, flotte_common::audit::AuditEvent)> = statement
        .query_map([], |row| {
            Ok((
                row.get(0)?,
                flotte_common::audit::AuditEvent {
                    at: row.get(1)?,
                    actor: row.get(2)?,
                    role: row.get(3)?,
                    action: row.get(4)?,
                    arguments_json: row.get(5)?,
                    result: row.get(6)?,
                },
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut previous = flotte_common::audit::GENESIS_HASH.to_owned();
    // Renumber from a high base first so that seq stays unique while moving.
    database
        .execute("UPDATE audit_log SET seq = seq + 1000000", [])
        .unwrap();
    for (index, (old_seq, event)) in rows.iter().enumerate() {
        let seq = index as u64 + 1;
        let hash = flotte_common::audit::entry_hash(seq, event, &previous);
        database
            .execute(
                "UPDATE audit_log SET seq = ?1, previous_hash = ?2, hash = ?3 WHERE seq = ?4",
                rusqlite::params![seq as i64, previous, hash, old_seq + 1_000_000],
            )
            .unwrap();
        previous = hash;
    }
}

/// Whoever can write the database can rewrite the whole chain consistently;
/// the server's signed checkpoints (key in the data dir, not the database)
/// and the head `flottectl` remembers catch rewriting, deletion and
/// truncation, and `audit verify` names what it found.
#[test]
fn signed_checkpoints_catch_a_rewritten_deleted_or_truncated_audit_log() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.append_config("[audit]\ncheckpoint_every_entries = 2\ncheckpoint_interval = \"1s\"\n");
    server.start();
    for zone in ["dc1", "dc2", "dc3", "dc4", "dc5", "dc6"] {
        server.token("role=web", zone, &[]);
    }
    let verify = || {
        let output = server.ctl(&["audit", "verify", "-o", "json"]);
        let verdict: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
        (output.status.success(), verdict, stderr_of(&output))
    };
    let mut last = (false, serde_json::Value::Null, String::new());
    let signed = wait_until(Duration::from_secs(30), || {
        last = verify();
        last.0 && last.1["signed_up_to"] == 7 && last.1["entries"] == 7
    });
    assert!(
        signed,
        "the head was not signed: {last:?}\n{}",
        server.log()
    );
    assert!(server.admin_profile().join("audit-head.json").exists());

    let database = rusqlite::Connection::open(flotte_server::store_path(&server.data_dir)).unwrap();
    database.busy_timeout(Duration::from_secs(10)).unwrap();
    database
        .execute_batch(
            "CREATE TABLE saved_log AS SELECT * FROM audit_log;
             CREATE TABLE saved_checkpoints AS SELECT * FROM audit_checkpoints;",
        )
        .unwrap();
    let put_back = || {
        database
            .execute_batch(
                "DELETE FROM audit_log; INSERT INTO audit_log SELECT * FROM saved_log;
                 DELETE FROM audit_checkpoints;
                 INSERT INTO audit_checkpoints SELECT * FROM saved_checkpoints;",
            )
            .unwrap();
        let (ok, verdict, stderr) = verify();
        assert!(
            ok,
            "the untouched log must verify again: {verdict} {stderr}"
        );
    };
    let expect_refusal = |scenario: &str, words: &[&str]| {
        let (ok, verdict, stderr) = verify();
        assert!(!ok, "{scenario}: audit verify passed: {verdict}");
        let reason = verdict["reason"].as_str().unwrap_or_default().to_owned();
        assert!(
            words.iter().any(|word| reason.contains(word)),
            "{scenario}: expected one of {words:?} in {reason:?} ({stderr})"
        );
        assert!(stderr.contains(&reason), "{scenario}: {stderr}");
        println!("{scenario}: audit verify -> {reason}");
    };

    // An entry edited and every later hash recomputed: the chain alone is
    // intact, the checkpoint signed after it is not.
    database
        .execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 3", [])
        .unwrap();
    rewrite_chain(&database);
    // Which entries were signed depends on timing: the words, not the number.
    expect_refusal(
        "edited and re-hashed",
        &["its hash differs from the one signed"],
    );
    put_back();

    // An entry deleted, the rest renumbered and re-hashed.
    database
        .execute("DELETE FROM audit_log WHERE seq = 5", [])
        .unwrap();
    rewrite_chain(&database);
    expect_refusal(
        "deleted and re-hashed",
        &[
            "its hash differs from the one signed",
            "entries were deleted",
        ],
    );
    put_back();

    // The last entries deleted: a checkpoint names an entry the log lacks.
    database
        .execute("DELETE FROM audit_log WHERE seq >= 6", [])
        .unwrap();
    expect_refusal("truncated", &["the log ends at entry 5 but entry"]);
    // ... and with their checkpoints: the head this profile remembered (7).
    database
        .execute("DELETE FROM audit_checkpoints WHERE seq >= 6", [])
        .unwrap();
    expect_refusal(
        "truncated with its checkpoints",
        &["the log ends at entry 5 but this profile saw a signed head at entry 7"],
    );
    put_back();

    // A forged checkpoint over a rewritten log.
    database
        .execute(
            "UPDATE audit_checkpoints SET head_hash = 'ff' || substr(head_hash, 3) WHERE seq = 7",
            [],
        )
        .unwrap();
    expect_refusal("forged checkpoint", &["its signature does not verify"]);
    put_back();
}

/// Relabelling is an operator's right; moving a machine into (or out of) a
/// grant's selector is granting (or revoking) SSH access, an admin's. The
/// refusal names the grant, and both attempts are in the audit log.
#[test]
fn an_operator_cannot_relabel_a_machine_into_a_grant_and_an_admin_can() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let server = started_server(&root);
    let operator = server.create_operator(root.path(), "carol", "operator");
    let token = server.token("role=db", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "db-1", &server.address, &token);
    agent.start();
    assert!(
        wait_until(Duration::from_secs(30), || server.connected_count() == 1),
        "{}",
        agent.log()
    );
    let key = root.path().join("carol-ssh");
    let generated = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "carol", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (openssh-client) runs");
    assert!(generated.success());
    let public = key.with_extension("pub");
    server.ctl_json(&[
        "user",
        "add",
        "carol",
        "--ssh-key",
        public.to_str().unwrap(),
    ]);
    let grant = server.ctl_json(&[
        "access",
        "grant",
        "carol",
        "--selector",
        "role=web",
        "--login",
        "carol",
    ]);
    let grant_id = grant[0]["id"].as_str().unwrap().to_owned();

    // A label no grant looks at: an operator may.
    succeeds(
        &server,
        &operator,
        &["machines", "label", "db-1", "--set", "team=a"],
    );
    // Into carol's own grant: refused, naming it; the machine keeps its labels.
    refused(
        &server,
        &operator,
        &["machines", "label", "db-1", "--set", "role=web"],
        &format!(
            "would change who can log in to it (grants {grant_id}): only an admin may do that"
        ),
    );
    let shown = server.ctl_json(&["machines", "show", "db-1"]);
    assert_eq!(shown["labels"]["role"], "db", "{shown}");
    // The same change by an admin goes through.
    server.ctl_ok(&["machines", "label", "db-1", "--set", "role=web"]);
    let shown = server.ctl_json(&["machines", "show", "db-1"]);
    assert_eq!(shown["labels"]["role"], "web", "{shown}");

    let relabels: Vec<(String, String)> = audit_entries(&server, &[])
        .iter()
        .filter(|entry| entry["action"] == "machine.label")
        .map(|entry| {
            (
                entry["actor"].as_str().unwrap().to_owned(),
                entry["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(relabels.len(), 3, "{relabels:?}");
    let has = |actor: &str, result: &dyn Fn(&str) -> bool| {
        relabels
            .iter()
            .any(|(who, what)| who == actor && result(what))
    };
    assert!(has("carol", &|what| what.starts_with("ok")), "{relabels:?}");
    assert!(
        has("carol", &|what| what.contains("only an admin may do that")),
        "{relabels:?}"
    );
    assert!(has("admin", &|what| what.starts_with("ok")), "{relabels:?}");
}

/// A refused call costs its caller nothing, so its arguments must not cost
/// the audit log either: two refused multi-megabyte plans from a viewer
/// leave `audit list` and `audit verify` working for an admin, each entry
/// keeping the size and digest of what was sent.
#[test]
fn refused_calls_with_huge_arguments_leave_the_audit_log_readable() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let server = started_server(&root);
    let viewer = server.create_operator(root.path(), "bob", "viewer");
    let plan = root.path().join("huge-plan.toml");
    std::fs::write(&plan, format!("# {}\n", "x".repeat(3_500_000))).unwrap();
    for _ in 0..2 {
        refused(
            &server,
            &viewer,
            &[
                "rollout",
                "create",
                "--image",
                "app@1.0.0",
                "--plan",
                plan.to_str().unwrap(),
            ],
            "needs role operator",
        );
    }
    let entries = audit_entries(&server, &["--actor", "bob"]);
    let refused_creates: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|entry| entry["action"] == "rollout.create")
        .collect();
    assert_eq!(refused_creates.len(), 2, "{entries:?}");
    for entry in refused_creates {
        let arguments = &entry["arguments"];
        assert_eq!(arguments["truncated"], true, "{arguments}");
        assert!(
            arguments["bytes"].as_u64().unwrap() > 3_500_000,
            "{arguments}"
        );
        assert_eq!(arguments["sha256"].as_str().unwrap().len(), 64);
    }
    server.ctl_ok(&["audit", "verify"]);
}
