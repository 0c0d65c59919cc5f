//! End-to-end tests of flottectl's everyday habits against a real server:
//! `version` names client and server releases and the caller, `-o yaml`
//! prints documents that parse as the same values as `-o json`,
//! `completion` prints scripts for the shells, `token list` says each
//! token's state, `machines list --selector` takes every form of the selector
//! grammar, `-o wide` adds columns to `machines list`, and named profiles
//! (`profile import/use/list`) choose who flottectl acts as.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::time::Duration;

use flotte_tests::{wait_until, Agent, Server, TempDir};

const PATIENCE: Duration = Duration::from_secs(30);

fn stdout_of(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn version_yaml_and_completions_work_against_a_real_server() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let release = env!("CARGO_PKG_VERSION");

    let table = stdout_of(&server.ctl(&["version"]));
    assert!(
        table.contains(&format!("client  flottectl {release}"))
            && table.contains(&format!(
                "server  flotte-server {release} (replica flotte-server)"
            ))
            && table.contains("you     admin (admin)"),
        "{table}"
    );

    let yaml: serde_json::Value =
        serde_norway::from_str(&stdout_of(&server.ctl(&["version", "-o", "yaml"]))).unwrap();
    assert_eq!(yaml, server.ctl_json(&["version"]));
    assert_eq!(yaml["server_version"], release);

    server.token("role=web", "dc1", &[]);
    let tokens_yaml = stdout_of(&server.ctl(&["token", "list", "-o", "yaml"]));
    assert!(
        !tokens_yaml.trim_start().starts_with('['),
        "YAML, not JSON: {tokens_yaml}"
    );
    let tokens: serde_json::Value = serde_norway::from_str(&tokens_yaml).unwrap();
    assert_eq!(tokens, server.ctl_json(&["token", "list"]));
    assert_eq!(tokens.as_array().unwrap().len(), 1);

    let refused = server.ctl(&["token", "list", "-o", "xml"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("[possible values: table, wide, json, yaml]"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef flottectl"),
        ("fish", "complete -c flottectl"),
    ] {
        let script = stdout_of(&server.ctl(&["completion", shell]));
        assert!(
            script.contains(marker) && script.contains("set-image"),
            "{shell}"
        );
    }
}

fn stderr_of_failure(output: &std::process::Output) -> String {
    assert!(!output.status.success(), "expected a refusal");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Token id → state, from `token list -o json`.
fn token_states(server: &Server) -> BTreeMap<String, String> {
    server
        .ctl_json(&["token", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|token| {
            (
                token["id"].as_str().unwrap().to_owned(),
                token["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn token_id(token: &str) -> String {
    token.split('.').nth(1).unwrap().to_owned()
}

#[test]
fn token_list_says_active_expired_spent_and_revoked() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let active = token_id(&server.token("role=web", "dc1", &[]));
    let spent_token = server.token("role=web", "dc1", &[]);
    let revoked = token_id(&server.token("role=web", "dc1", &[]));
    assert!(server.ctl(&["token", "revoke", &revoked]).status.success());
    let expired = token_id(&server.token("role=web", "dc1", &["--ttl", "2s"]));
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &spent_token);
    agent.start_and_wait_for_session(&server);
    let spent = token_id(&spent_token);

    assert!(
        wait_until(PATIENCE, || token_states(&server)
            .get(&expired)
            .is_some_and(|state| state == "expired")),
        "{:?}",
        token_states(&server)
    );
    let expected: BTreeMap<String, String> = [
        (active, "active"),
        (expired, "expired"),
        (spent, "spent"),
        (revoked, "revoked"),
    ]
    .into_iter()
    .map(|(id, state)| (id, state.to_owned()))
    .collect();
    assert_eq!(token_states(&server), expected);

    let table = stdout_of(&server.ctl(&["token", "list"]));
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    assert!(
        header.contains("CREATED") && header.ends_with("STATE"),
        "{header}"
    );
    for line in lines {
        let cells: Vec<&str> = line.split_whitespace().collect();
        let id = cells[0];
        assert_eq!(
            Some(&cells[cells.len() - 1].to_owned()),
            expected.get(id),
            "{line}"
        );
        // CREATED and EXPIRES are RFC 3339 times.
        let times: Vec<&&str> = cells
            .iter()
            .filter(|cell| humantime::parse_rfc3339(cell).is_ok())
            .collect();
        assert_eq!(times.len(), 2, "{line}");
    }
}

/// Hostnames `machines list --selector SELECTOR` lists.
fn selected(server: &Server, selector: &str) -> BTreeSet<String> {
    server
        .ctl_json(&["machines", "list", "--selector", selector])
        .as_array()
        .unwrap()
        .iter()
        .map(|machine| machine["hostname"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_selector_form_chooses_machines_and_wide_adds_columns() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let fleet = [
        ("web-1", "role=web,env=staging,canary=yes", "dc1"),
        ("db-1", "role=db,env=prod,tier=gold,legacy=yes", "dc2"),
        ("web-2", "role=web,env=prod", "dc3"),
    ];
    // Enrolled one after the other, each waited for: the machines are
    // listed in a known state before any selector is tried.
    let mut agents = Vec::new();
    for (index, (name, labels, zone)) in fleet.into_iter().enumerate() {
        let token = server.token(labels, zone, &[]);
        let mut agent = Agent::new(root.path(), name, &server.address, &token);
        agent.start();
        let connected = wait_until(PATIENCE, || server.connected_count() == index + 1);
        assert!(connected, "{name}:\n{}", agent.log());
        agents.push(agent);
    }

    let cases: [(&str, &[&str]); 8] = [
        ("role=web", &["web-1", "web-2"]),
        ("env!=prod", &["web-1"]),
        ("zone in (dc1,dc2)", &["web-1", "db-1"]),
        ("tier notin (gold)", &["web-1", "web-2"]),
        ("canary", &["web-1"]),
        ("!legacy", &["web-1", "web-2"]),
        ("role notin (web),zone", &["db-1"]),
        (
            "role=web,env!=prod,zone in (dc1,dc2),tier notin (gold),canary,!legacy",
            &["web-1"],
        ),
    ];
    for (selector, hostnames) in cases {
        let expected: BTreeSet<String> = hostnames.iter().map(|name| (*name).to_owned()).collect();
        assert_eq!(selected(&server, selector), expected, "{selector}");
    }
    let refused =
        stderr_of_failure(&server.ctl(&["machines", "list", "--selector", "zone in (dc1"]));
    assert!(
        refused.contains("never closed") && refused.contains("\"zone in (dc1\""),
        "{refused}"
    );

    // A grant keeps the selector as written and reaches the machines it names.
    let key = root.path().join("alice.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKvkDk0qYpGPzoRl3X27cRHkeu9MS8y63dSFMpU6xIuH alice@laptop\n",
    )
    .unwrap();
    server.ctl_json(&["user", "add", "alice", "--ssh-key", key.to_str().unwrap()]);
    let grant_selector = "role in (web),!legacy,env!=prod";
    server.ctl_json(&[
        "access",
        "grant",
        "alice",
        "--selector",
        grant_selector,
        "--login",
        "alice",
    ]);
    let grants = stdout_of(&server.ctl(&["access", "list", "-o", "json"]));
    assert!(grants.contains(grant_selector), "{grants}");

    // `-o wide` is the table with more columns; `-o table` stays as it was.
    let machines = server.machines();
    let table = stdout_of(&server.ctl(&["machines", "list"]));
    let wide = stdout_of(&server.ctl(&["machines", "list", "-o", "wide"]));
    let table_header = table.lines().next().unwrap();
    let wide_header = wide.lines().next().unwrap();
    assert!(table_header.ends_with("IMAGE BUILT"), "{table_header}");
    assert!(
        wide_header.starts_with(table_header.trim_end()),
        "{wide_header}"
    );
    // Columns are apart by two spaces at least; a name may hold one.
    let columns = |header: &str| -> Vec<String> {
        header
            .split("  ")
            .map(str::trim)
            .filter(|column| !column.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let added = &columns(wide_header)[columns(table_header).len()..];
    assert_eq!(
        added.join(","),
        "ADDRESS,OS,KERNEL,ARCH,DESIRED IMAGE,APPLIED,CERT EXPIRES"
    );
    for machine in &machines {
        let hostname = machine["hostname"].as_str().unwrap();
        let row = wide.lines().find(|line| line.contains(hostname)).unwrap();
        for field in ["remote_address", "kernel", "arch", "certificate_expires_at"] {
            let value = machine[field].as_str().unwrap();
            assert!(
                !value.is_empty() && row.contains(value),
                "{field} {value} in {row}"
            );
        }
        let applied = format!(
            "{}/{}",
            machine["applied_desired_version"], machine["desired_version"]
        );
        assert!(row.contains(&applied), "{applied} in {row}");
    }
}

/// Runs flottectl with no `--profile` and no `FLOTTE_PROFILE`, as a user
/// whose configuration lives in `config_home`.
fn flottectl_as_user(config_home: &std::path::Path, server: &Server, args: &[&str]) -> Output {
    std::process::Command::new(flotte_tests::binary("flottectl"))
        .args(args)
        .env("XDG_CONFIG_HOME", config_home)
        .env("FLOTTE_SERVER", &server.address)
        .env_remove("FLOTTE_PROFILE")
        .output()
        .unwrap()
}

fn operator_named_by_version(output: &Output) -> String {
    let version: serde_json::Value = serde_json::from_slice(&stdout_of(output).into_bytes())
        .unwrap_or_else(|error| panic!("{error}: {}", String::from_utf8_lossy(&output.stdout)));
    version["operator"].as_str().unwrap().to_owned()
}

#[test]
fn named_profiles_choose_who_flottectl_acts_as() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let viewer = server.create_operator(root.path(), "auditor", "viewer");
    let config_home = root.path().join("config");

    let none = flottectl_as_user(&config_home, &server, &["machines", "list"]);
    assert_eq!(none.status.code(), Some(2));
    assert!(
        stderr_of_failure(&none).contains("flottectl profile import DIR --name NAME"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );

    let admin = server.admin_profile();
    let imported = flottectl_as_user(
        &config_home,
        &server,
        &[
            "profile",
            "import",
            admin.to_str().unwrap(),
            "--name",
            "prod",
        ],
    );
    assert!(stdout_of(&imported).contains("(current)"));
    let version = |args: &[&str]| {
        let mut all = vec!["version", "-o", "json"];
        all.extend(args);
        operator_named_by_version(&flottectl_as_user(&config_home, &server, &all))
    };
    assert_eq!(version(&[]), "admin", "the first import is current");

    let second = flottectl_as_user(
        &config_home,
        &server,
        &[
            "profile",
            "import",
            viewer.to_str().unwrap(),
            "--name",
            "audit",
        ],
    );
    assert!(stdout_of(&second).contains("`flottectl profile use` makes it current"));
    assert_eq!(version(&[]), "admin", "importing does not switch");
    assert_eq!(version(&["--profile", "audit"]), "auditor");

    stdout_of(&flottectl_as_user(
        &config_home,
        &server,
        &["profile", "use", "audit"],
    ));
    assert_eq!(version(&[]), "auditor");
    let listed: serde_json::Value = serde_json::from_str(&stdout_of(&flottectl_as_user(
        &config_home,
        &server,
        &["profile", "list", "-o", "json"],
    )))
    .unwrap();
    let current: Vec<(&str, bool)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["name"].as_str().unwrap(), row["current"] == true))
        .collect();
    assert_eq!(current, [("audit", true), ("prod", false)]);

    for (args, expected) in [
        (
            vec![
                "profile",
                "import",
                admin.to_str().unwrap(),
                "--name",
                "prod",
            ],
            "exists already",
        ),
        (
            vec![
                "profile",
                "import",
                admin.to_str().unwrap(),
                "--name",
                ".hidden",
            ],
            "profile name \".hidden\"",
        ),
        (vec!["--profile", "staging", "version"], "no profile named"),
        (vec!["profile", "use", "staging"], "no profile named"),
    ] {
        let refused = flottectl_as_user(&config_home, &server, &args);
        assert_eq!(refused.status.code(), Some(2), "{args:?}");
        assert!(
            stderr_of_failure(&refused).contains(expected),
            "{args:?}: {}",
            String::from_utf8_lossy(&refused.stderr)
        );
    }
}
