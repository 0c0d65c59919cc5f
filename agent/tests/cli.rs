//! The `flotte-agent` command line as an operator meets it: a bad settings
//! file makes `run` exit with status 2 listing every problem at once, before
//! anything touches the network or the data dir.

// Test code: a failed setup step must stop the test with its message, helpers
// included (clippy exempts only the #[test] functions themselves).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// A fresh scratch directory for one test under cargo's per-target temp dir
/// (left in place after a failure, for inspection; replaced on the next run).
fn scratch_dir(test_name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("flotte-agent-cli-{test_name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_with_config(config: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotte-agent"))
        .arg("run")
        .arg("--config")
        .arg(config)
        // A token in the environment would override the file's.
        .env_remove("FLOTTE_JOIN_TOKEN")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[test]
fn run_with_a_bad_config_exits_2_listing_every_problem() {
    let scratch = scratch_dir("bad-config");
    let config = scratch.join("bad.toml");
    let missing_token_file = scratch.join("no-such-token");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = ""
servers = ["nohost", "flotte.example.com:0"]
join_token_file = "{}"
report_interval = "0s"
reconnect_initial_backoff = "soon"
reconnect_max_backoff = "later"
"#,
            missing_token_file.display()
        ),
    )
    .unwrap();
    let output = run_with_config(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for expected in [
        "data_dir must not be empty",
        "servers: \"nohost\" is not host:port",
        "servers: \"flotte.example.com:0\" is not host:port",
        "no-such-token: cannot read",
        "report_interval = \"0s\" is too short",
        "reconnect_initial_backoff = \"soon\" is not a duration",
        "reconnect_max_backoff = \"later\" is not a duration",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected:?} missing from:\n{stderr}"
        );
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn run_with_a_malformed_join_token_and_no_server_lists_both() {
    let scratch = scratch_dir("bad-token");
    let config = scratch.join("bad.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nservers = []\njoin_token = \"garbage\"\n",
            scratch.join("agent").display()
        ),
    )
    .unwrap();
    let output = run_with_config(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for expected in [
        "servers must list at least one host:port",
        "join token: join token is malformed",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected:?} missing from:\n{stderr}"
        );
    }
    assert!(
        !scratch.join("agent").exists(),
        "a refused config must not create the data dir"
    );
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn run_with_an_unknown_key_exits_2_naming_it() {
    let scratch = scratch_dir("unknown-key");
    let config = scratch.join("typo.toml");
    std::fs::write(
        &config,
        "data_dir = \"/tmp/x\"\nservers = [\"a:1\"]\nsever = \"b:2\"\n",
    )
    .unwrap();
    let output = run_with_config(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sever") && stderr.contains("typo.toml"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&scratch).unwrap();
}
