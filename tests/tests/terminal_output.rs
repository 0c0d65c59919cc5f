//! End-to-end tests of what flottectl prints from values that others
//! control (issue 14, item 9): escape sequences, bidi overrides and carriage
//! returns from a user's key comment and an agent's check output reach the
//! operator's terminal as visible escapes, a 70 000-character value is cut in
//! tables without a panic, `-o json` keeps every value whole, and a reader
//! that closes the pipe early ends flottectl quietly. Real server, agent and
//! flottectl binaries.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use flotte_tests::{binary, wait_until, Agent, Server, TempDir};

/// A valid ed25519 public key (type and 32 key bytes), without a comment.
const PUBLIC_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g";

/// Whether text holds a character that would act on a terminal rather than
/// show (the newlines that end lines aside).
fn holds_raw_control(text: &str) -> bool {
    text.chars().any(|character| {
        (character.is_control() && character != '\n')
            || ('\u{202a}'..='\u{202e}').contains(&character)
            || ('\u{2066}'..='\u{2069}').contains(&character)
    })
}

fn started_server(root: &std::path::Path) -> Server {
    let mut server = Server::init(root, "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.start();
    server
}

#[test]
fn a_hostile_key_comment_is_escaped_and_cut_in_user_show_and_whole_in_json() {
    let root = TempDir::new("flotte-output").unwrap();
    let server = started_server(root.path());
    let comment = format!(
        "evil\x1b]0;pwned\x07\x1b[2J\u{202e}gnp.exe{}",
        "c".repeat(70_000)
    );
    let key_file = root.path().join("mallory.pub");
    std::fs::write(&key_file, format!("{PUBLIC_KEY} {comment}\n")).unwrap();
    let added = server.ctl(&[
        "user",
        "add",
        "mallory",
        "--ssh-key",
        key_file.to_str().unwrap(),
    ]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );

    let shown = server.ctl(&["user", "show", "mallory"]);
    let stdout = String::from_utf8(shown.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&shown.stderr);
    assert!(shown.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!holds_raw_control(&stdout), "raw control in: {stdout:?}");
    // Escaped, then cut to 60 columns: the escaped prefix, `c` up to 59
    // columns and the ellipsis.
    let escaped_prefix = "evil\\x1b]0;pwned\\x07\\x1b[2J\\u{202e}gnp.exe";
    let cut = format!("{escaped_prefix}{}…", "c".repeat(59 - escaped_prefix.len()));
    let key_row = stdout
        .lines()
        .find(|line| line.contains("ssh-ed25519"))
        .unwrap_or_else(|| panic!("no key row in {stdout}"));
    assert!(key_row.ends_with(&cut), "{key_row}");
    assert!(
        stdout.lines().all(|line| line.chars().count() < 200),
        "{stdout}"
    );

    let json = server.ctl(&["user", "show", "mallory", "-o", "json"]);
    assert!(json.status.success());
    let json_text = String::from_utf8(json.stdout).unwrap();
    assert!(!holds_raw_control(&json_text), "raw control in the JSON");
    let parsed: serde_json::Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(parsed["keys"][0]["comment"], comment.as_str());
}

#[test]
fn a_hostile_check_output_is_escaped_in_machines_show_and_whole_in_json() {
    let root = TempDir::new("flotte-output").unwrap();
    let server = started_server(root.path());
    let token = server.token("role=batch", "dc1", &[]);
    // Colour, a window title, a bidi override, a carriage return that would
    // overwrite the line, and a second line.
    let script = r"printf '\033[31mred\033]0;title\007\342\200\256evil\rforged\nsecond'; exit 1";
    let mut agent = Agent::new(root.path(), "batch-1", &server.address, &token).with_config(
        &format!(
            "[[check]]\nname = \"hostile\"\nkind = \"exec\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", {script:?}]\ninterval = \"300ms\"\ntimeout = \"300ms\"\ncritical = false\n"
        ),
    );
    agent.start_and_wait_for_session(&server);
    let last_output = || {
        server.ctl_json(&["machines", "show", "batch-1"])["checks"][0]["last_output"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(30), || last_output().contains("forged")),
        "{}",
        agent.log()
    );
    // JSON: the agent's output whole.
    assert!(
        last_output().contains("\x1b[31mred\x1b]0;title\x07\u{202e}evil\rforged\nsecond"),
        "{:?}",
        last_output()
    );

    let shown = server.ctl(&["machines", "show", "batch-1"]);
    let stdout = String::from_utf8(shown.stdout).unwrap();
    assert!(shown.status.success());
    assert!(!holds_raw_control(&stdout), "raw control in: {stdout:?}");
    assert!(
        stdout.contains("  | \\x1b[31mred\\x1b]0;title\\x07\\u{202e}evil\\rforged\n  | second"),
        "{stdout}"
    );
}

#[test]
fn a_reader_that_closes_the_pipe_early_ends_flottectl_quietly() {
    let root = TempDir::new("flotte-output").unwrap();
    let server = started_server(root.path());
    let mut child = Command::new(binary("flottectl"))
        .arg("--profile")
        .arg(server.admin_profile())
        .args(["--server", &server.address, "machines", "list"])
        .env_remove("FLOTTE_PROFILE")
        .env_remove("FLOTTE_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closing the only read end before flottectl has dialed the server makes
    // its first write fail with EPIPE, as `| head -0` would.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(status.success(), "{status:?}: {stderr}");
}
