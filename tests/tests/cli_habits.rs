//! End-to-end tests of flottectl's everyday habits against a real server:
//! `version` names client and server releases and the caller, `-o yaml`
//! prints documents that parse as the same values as `-o json`, and
//! `completion` prints scripts for the shells.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flotte_tests::{Server, TempDir};

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
        String::from_utf8_lossy(&refused.stderr).contains("expected table, json or yaml"),
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
