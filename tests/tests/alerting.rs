//! Alerting: the example Prometheus rules pass `promtool check rules` and
//! their promtool unit tests, and name only series the server exports; a real
//! server's webhooks in the Slack and Alertmanager formats reach a real HTTPS
//! receiver with the expected shape, and its `/metrics` follow a real event
//! (an agent gone: machine unreachable, remediation breaker open in its zone).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flotte_tests::https_endpoint::{TestCa, TestEndpoint};
use flotte_tests::{sample_value, scrape, wait_until, Agent, Server, TempDir};

const SKIP_PROMTOOL_VARIABLE: &str = "FLOTTE_TEST_SKIP_PROMTOOL";
const TIMEOUT: Duration = Duration::from_secs(20);

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("deploy/prometheus")
}

/// Runs `promtool ARGS` in deploy/prometheus; `None` when promtool is
/// missing and the skip variable asks to go on without it.
fn promtool(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("promtool")
        .args(args)
        .current_dir(prometheus_dir())
        .output()
    {
        Ok(output) => Some(output),
        Err(error) => {
            assert!(
                std::env::var(SKIP_PROMTOOL_VARIABLE).as_deref() == Ok("1"),
                "promtool cannot run ({error}): install Debian's prometheus package, \
                 or set {SKIP_PROMTOOL_VARIABLE}=1 to skip this test explicitly"
            );
            println!("SKIPPED ({SKIP_PROMTOOL_VARIABLE}=1): promtool is missing");
            None
        }
    }
}

#[test]
fn the_example_rules_pass_promtool_and_their_unit_tests() {
    for args in [
        ["check", "rules", "flotte-rules.yml"],
        ["test", "rules", "flotte-rules.test.yml"],
    ] {
        let Some(output) = promtool(&args) else {
            return;
        };
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The `flotte_*` names an expression of the rules file uses.
fn series_in_rules() -> Vec<String> {
    let rules = std::fs::read_to_string(prometheus_dir().join("flotte-rules.yml")).unwrap();
    let mut names: Vec<String> = rules
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(|line| {
            line.split(|character: char| !(character.is_ascii_alphanumeric() || character == '_'))
                .filter(|word| word.starts_with("flotte_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn webhooks_in_slack_and_alertmanager_formats_and_metrics_follow_a_machine_gone() {
    let root = TempDir::new("flotte-alerting").unwrap();
    let ca = TestCa::new(root.path());
    let receiver = TestEndpoint::https(&ca);
    let mut server = Server::init(root.path(), "server", &[]).with_run_args(&[
        "--report-interval",
        "1s",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    // A rule that selects nothing: the breaker is computed, nothing is replaced.
    server.append_config(&format!(
        "[[webhook]]\nurl = \"{}\"\nca_file = \"{}\"\nformat = \"slack\"\ntimeout = \"2s\"\n\n\
         [[webhook]]\nurl = \"{}\"\nca_file = \"{}\"\nformat = \"alertmanager\"\n\
         generator_url = \"https://flotte.example/machines\"\ntimeout = \"2s\"\n\n\
         [remediation]\ninterval = \"500ms\"\n\n\
         [[remediation.rule]]\nselector = \"role=nothing\"\nafter = \"1h\"\nprovider = \"none\"\n\n\
         [[remediation.provider]]\nname = \"none\"\nkind = \"command\"\ncommand = \"/bin/false\"\n",
        receiver.url("/slack"),
        ca.ca_file.display(),
        receiver.url("/alertmanager"),
        ca.ca_file.display(),
    ));
    server.start();
    let metrics = server.metrics_address().unwrap();
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start_and_wait_for_session(&server);

    // Every rule's series is exported, with bounded labels, before any event.
    let first = scrape(&metrics);
    for name in series_in_rules() {
        assert!(
            first.samples.iter().any(|sample| sample.metric == name),
            "{name} is used by the rules but not exported"
        );
    }
    for state in ["pending", "running", "paused", "failed", "succeeded"] {
        assert_eq!(
            sample_value(&first, "flotte_rollouts", &[("state", state)]),
            Some(0.0),
            "{state}"
        );
    }
    assert_eq!(
        sample_value(&first, "flotte_remediation_breaker_open", &[("zone", "")]),
        Some(0.0)
    );
    assert_eq!(
        sample_value(&first, "flotte_access_policy_behind", &[]),
        Some(0.0)
    );

    // The machine goes: unreachable, and its zone (all of it) trips the breaker.
    agent.kill();
    let gone = wait_until(TIMEOUT, || {
        let now = scrape(&metrics);
        sample_value(
            &now,
            "flotte_machines",
            &[("state", "unreachable"), ("zone", "dc1")],
        ) == Some(1.0)
            && sample_value(&now, "flotte_remediation_breaker_open", &[("zone", "")]) == Some(1.0)
            && sample_value(&now, "flotte_remediation_breaker_open", &[("zone", "dc1")])
                == Some(1.0)
    });
    assert!(gone, "{:?}\n{}", scrape(&metrics).samples, server.log());

    // Slack: text and blocks, saying what happened to whom.
    let slack_said = |needle: &str| {
        receiver.received_json("/slack").iter().any(|message| {
            message["text"]
                .as_str()
                .unwrap_or_default()
                .contains(needle)
        })
    };
    assert!(
        wait_until(TIMEOUT, || slack_said(
            "[critical] Machine web-1 is unreachable"
        )),
        "{:?}\n{}",
        receiver.received_json("/slack"),
        server.log()
    );
    let slack = receiver.received_json("/slack");
    let message = slack
        .iter()
        .find(|message| message["text"].as_str().unwrap().contains("unreachable"))
        .unwrap();
    assert_eq!(message["blocks"][0]["type"], "section", "{message}");
    assert_eq!(message["blocks"][0]["text"]["type"], "mrkdwn", "{message}");
    assert!(
        message["blocks"][1]["elements"][0]["text"]
            .as_str()
            .unwrap()
            .contains("zone: dc1"),
        "{message}"
    );
    assert!(wait_until(TIMEOUT, || slack_said(
        "Remediation breaker open"
    )));

    // Alertmanager: arrays of alerts with labels, annotations and times.
    let alertmanager_alerts = || -> Vec<serde_json::Value> {
        receiver
            .received_json("/alertmanager")
            .iter()
            .flat_map(|batch| batch.as_array().cloned().unwrap_or_default())
            .collect()
    };
    let firing = |alertname: &str| {
        alertmanager_alerts().into_iter().find(|alert| {
            alert["labels"]["alertname"] == alertname && alert.get("endsAt").is_none()
        })
    };
    assert!(
        wait_until(TIMEOUT, || firing("FlotteMachineUnhealthy").is_some()
            && firing("FlotteRemediationBreakerOpen").is_some()),
        "{:?}",
        alertmanager_alerts()
    );
    let machine = firing("FlotteMachineUnhealthy").unwrap();
    assert_eq!(machine["labels"]["severity"], "critical", "{machine}");
    assert_eq!(machine["labels"]["machine"], "web-1", "{machine}");
    assert_eq!(machine["labels"]["zone"], "dc1", "{machine}");
    assert_eq!(
        machine["annotations"]["summary"],
        "Machine web-1 is unreachable"
    );
    assert_eq!(machine["generatorURL"], "https://flotte.example/machines");
    let starts_at = machine["startsAt"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(starts_at).is_ok(),
        "{starts_at} is not RFC 3339"
    );
    let breaker = firing("FlotteRemediationBreakerOpen").unwrap();
    assert!(
        breaker["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains("zone dc1"),
        "{breaker}"
    );
    assert!(receiver
        .received()
        .iter()
        .all(|request| request.content_type.as_deref() == Some("application/json")));
}
