//! End-to-end tests of repair with the real binaries: quarantine by hand
//! (hooks, forensic bundle, release), automatic remediation through the
//! `local` provider (a replacement agent enrolls and turns operational while
//! the sick machine is kept), and the breaker that refuses to "repair" a
//! partitioned zone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotte_tests::{
    binary, upload_forensics_as_machine, wait_until, Agent, Server, TempDir, TestHttpService,
    WebhookReceiver,
};

const LONG: Duration = Duration::from_secs(60);

fn machine(server: &Server, hostname: &str) -> serde_json::Value {
    server
        .machines()
        .into_iter()
        .find(|machine| machine["hostname"] == hostname)
        .unwrap_or(serde_json::Value::Null)
}

fn http_check(service: &TestHttpService) -> String {
    format!(
        "[[check]]\nname = \"web\"\nkind = \"http\"\nurl = \"http://{}/health\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\nfall = 2\ncritical = true\n",
        service.address
    )
}

/// A server reporting every second whose settings get `extra` (it is started
/// once to learn its address, which the settings may need, then restarted).
fn server_with(root: &Path, extra: impl FnOnce(&str) -> String) -> Server {
    let mut server = Server::init(root, "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.start();
    server.terminate(Duration::from_secs(10));
    let settings = extra(&server.address);
    server.append_config(&settings);
    server.start();
    server
}

/// `[remediation]` with the local provider starting replacement agents
/// under `<root>/replacements` with `replacement_config`.
fn remediation_settings(
    root: &Path,
    address: &str,
    selector: &str,
    replacement_config: &Path,
) -> String {
    format!(
        "[remediation]\ninterval = \"500ms\"\nreplacement_timeout = \"2m\"\n\n\
         [[remediation.rule]]\nselector = \"{selector}\"\nafter = \"2s\"\nprovider = \"local\"\n\n\
         [[remediation.provider]]\nname = \"local\"\nkind = \"local\"\nagent_binary = \"{}\"\n\
         base_dir = \"{}\"\nserver = \"{address}\"\nagent_config = \"{}\"\n\
         agent_args = [\"--report-interval\", \"1s\", \"--reconnect-max-backoff\", \"1s\"]\n",
        binary("flotte-agent").display(),
        root.join("replacements").display(),
        replacement_config.display()
    )
}

/// The pids of the replacement agents the local provider started.
fn replacement_pids(root: &Path) -> Vec<i32> {
    std::fs::read_dir(root.join("replacements"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| std::fs::read_to_string(entry.path().join("agent.pid")).ok())
                .filter_map(|pid| pid.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn process_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
}

/// Downloads the forensic bundle into `out` once there is one.
fn wait_for_forensics(server: &Server, hostname: &str, out: &Path) -> serde_json::Value {
    let target = out.to_str().unwrap();
    let mut last = String::new();
    let found = wait_until(LONG, || {
        let output = server.ctl(&[
            "machines",
            "forensics",
            hostname,
            "--out",
            target,
            "-o",
            "json",
        ]);
        last = String::from_utf8_lossy(&output.stderr).into_owned();
        output.status.success()
    });
    assert!(found, "no forensic bundle for {hostname}: {last}");
    server.ctl_json(&["machines", "forensics", hostname, "--out", target])
}

fn bundle_file(bundle: &serde_json::Value, name: &str) -> String {
    let directory = PathBuf::from(bundle["directory"].as_str().unwrap());
    std::fs::read_to_string(directory.join(name))
        .unwrap_or_else(|error| panic!("{name}: {error} in {bundle}"))
}

/// Starts one agent per `(name, labels, zone, agent.toml)`, each with its own join token.
fn start_agents(server: &Server, root: &Path, fleet: &[(&str, &str, &str, String)]) -> Vec<Agent> {
    fleet
        .iter()
        .map(|(name, labels, zone, config)| {
            let token = server.token(labels, zone, &[]);
            let mut agent = Agent::new(root, name, &server.address, &token);
            if !config.is_empty() {
                agent = agent.with_config(config);
            }
            agent.start();
            agent
        })
        .collect()
}

fn operational_count(server: &Server) -> usize {
    server
        .machines()
        .iter()
        .filter(|machine| machine["state"] == "operational")
        .count()
}

/// Waits until the newest remediation event is closed; every event.
fn wait_for_closed_event(server: &Server) -> serde_json::Value {
    let mut events = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(120), || {
            events = server.ctl_json(&["remediation", "list"]);
            events[0]["state"] == "closed"
        }),
        "remediation did not close: {events}\n{}",
        server.log()
    );
    events
}

#[test]
fn a_quarantine_by_hand_runs_the_hooks_uploads_forensics_keeps_the_machine_and_release_undoes_it() {
    let root = TempDir::new("flotte-quarantine").unwrap();
    let server = server_with(root.path(), |_| String::new());
    let mut service = TestHttpService::start();
    let hooks = root.path().join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token).with_config(&format!(
        "{}\n[quarantine]\non_quarantine = [\"/bin/sh\", \"-c\", \"echo \\\"$FLOTTE_QUARANTINE_BY: $FLOTTE_QUARANTINE_REASON\\\" >> {hooks}/quarantined\"]\non_release = [\"/bin/sh\", \"-c\", \"echo released >> {hooks}/released\"]\n",
        http_check(&service),
        hooks = hooks.display()
    ));
    agent.start();
    assert!(
        wait_until(LONG, || machine(&server, "web-1")["state"] == "operational"),
        "{}",
        agent.log()
    );
    service.stop();
    assert!(
        wait_until(LONG, || machine(&server, "web-1")["state"] == "down"),
        "{}",
        agent.log()
    );

    let quarantined =
        server.ctl_json(&["machines", "quarantine", "web-1", "--reason", "disk errors"]);
    assert_eq!(quarantined["reason"], "disk errors");
    assert_eq!(quarantined["by"], "admin");
    assert!(
        wait_until(LONG, || std::fs::read_to_string(hooks.join("quarantined"))
            .is_ok_and(|text| text == "admin: disk errors\n")),
        "{}",
        agent.log()
    );

    let bundle = wait_for_forensics(&server, "web-1", &root.path().join("forensics"));
    assert_eq!(bundle["quarantine_id"], quarantined["id"]);
    let files: Vec<&str> = bundle["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for expected in [
        "checks.json",
        "service.log",
        "processes.txt",
        "mounts.txt",
        "system.json",
        "kernel.txt",
        "swap-journal.json",
    ] {
        assert!(
            files.contains(&expected),
            "{expected} missing from {files:?}"
        );
    }
    let checks = bundle_file(&bundle, "checks.json");
    assert!(checks.contains(&service.address.to_string()), "{checks}");
    assert!(checks.contains("\"healthy\": false"), "{checks}");
    let agent_pid = agent.process.as_ref().unwrap().pid().unwrap();
    assert!(
        bundle_file(&bundle, "processes.txt")
            .lines()
            .any(|line| line.starts_with(&format!("{agent_pid} "))),
        "the agent itself is in the process list"
    );
    assert!(bundle_file(&bundle, "quarantine.json").contains("disk errors"));

    // One bundle per quarantine: a second upload for it (a compromised
    // machine forging evidence) is refused, and the first one is served.
    let quarantine_id = quarantined["id"].as_str().unwrap();
    let forged = upload_forensics_as_machine(
        &agent.data_dir,
        &server.address,
        quarantine_id,
        b"forged evidence",
    )
    .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::AlreadyExists, "{forged:?}");
    assert!(
        forged.message().contains("later uploads are refused"),
        "{forged:?}"
    );
    let again = server.ctl_json(&[
        "machines",
        "forensics",
        "web-1",
        "--quarantine",
        quarantine_id,
        "--out",
        root.path().join("forensics-again").to_str().unwrap(),
    ]);
    assert_eq!(again["sha256"], bundle["sha256"], "{again}");
    assert_eq!(again["size"], bundle["size"], "{again}");
    let kept = server.ctl_json(&["machines", "forensics", "web-1", "--list"]);
    let kept = kept.as_array().unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["quarantine_id"], quarantined["id"]);
    assert_eq!(kept[0]["size"], bundle["size"]);

    // Kept: enrolled, connected, reporting, its data untouched.
    let shown = server.ctl_json(&["machines", "show", "web-1"]);
    assert_eq!(shown["connected"], true, "{shown}");
    assert_eq!(shown["quarantine"]["reason"], "disk errors", "{shown}");
    assert!(agent.is_enrolled() && agent.is_running());
    let listed = server.ctl(&["machines", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("down [quarantined]"));
    // A viewer may look, not quarantine.
    let viewer = server.create_operator(root.path(), "vera", "viewer");
    let refused =
        flotte_tests::flottectl(&viewer, &server.address, &["machines", "release", "web-1"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("operator"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let lines = |name: &str| {
        std::fs::read_to_string(hooks.join(name))
            .map(|text| text.lines().count())
            .unwrap_or(0)
    };
    // Restarted while quarantined: the hook is not run again, the bundle not
    // sent again; released while stopped: the release is seen on restart.
    agent.terminate(Duration::from_secs(10));
    let released = server.ctl_json(&["machines", "release", "web-1"]);
    assert_eq!(released["quarantined"], false);
    assert!(server.ctl_json(&["machines", "show", "web-1"])["quarantine"].is_null());
    agent.start();
    assert!(
        wait_until(LONG, || lines("released") == 1),
        "{}",
        agent.log()
    );
    assert_eq!(lines("quarantined"), 1, "on_quarantine ran once");
    assert_eq!(agent.log().matches("forensic bundle uploaded").count(), 1);

    // A second quarantine, released while the agent runs.
    let second = server.ctl_json(&["machines", "quarantine", "web-1", "--reason", "again"]);
    assert_ne!(second["id"], quarantined["id"]);
    assert!(
        wait_until(LONG, || lines("quarantined") == 2),
        "{}",
        agent.log()
    );
    server.ctl_json(&["machines", "release", "web-1"]);
    assert!(
        wait_until(LONG, || lines("released") == 2),
        "{}",
        agent.log()
    );
    let audit = server.ctl_json(&["audit", "list"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|entry| entry["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"machine.quarantine") && actions.contains(&"machine.release"),
        "{actions:?}"
    );
}

#[test]
fn a_machine_whose_service_dies_is_quarantined_and_replaced_through_the_local_provider() {
    let root = TempDir::new("flotte-remediation").unwrap();
    let mut dying_service = TestHttpService::start();
    let healthy_service = TestHttpService::start();
    let replacement_config = root.path().join("replacement-agent.toml");
    std::fs::write(&replacement_config, http_check(&healthy_service)).unwrap();
    let webhook = WebhookReceiver::start();
    let mut server = server_with(root.path(), |address| {
        format!(
            "[[webhook]]\nurl = \"{}\"\ntimeout = \"2s\"\n\n{}",
            webhook.url,
            remediation_settings(root.path(), address, "role=web", &replacement_config)
        )
    });
    // Three machines in dc1, so that one sick machine is a third of the zone.
    let mut agents = start_agents(
        &server,
        root.path(),
        &[
            (
                "web-1",
                "role=web,tier=front",
                "dc1",
                http_check(&dying_service),
            ),
            (
                "web-2",
                "role=web,tier=front",
                "dc1",
                http_check(&healthy_service),
            ),
            (
                "web-3",
                "role=web,tier=front",
                "dc1",
                http_check(&healthy_service),
            ),
        ],
    );
    assert!(
        wait_until(LONG, || operational_count(&server) == 3),
        "{:?}",
        server.machines()
    );
    let sick_id = machine(&server, "web-1")["id"].as_str().unwrap().to_owned();
    let status = server.ctl_json(&["status"]);
    assert_eq!(status["remediation"]["enabled"], true, "{status}");
    assert_eq!(status["remediation"]["breaker_open"], false, "{status}");

    // The service dies: down, then quarantined and replaced.
    dying_service.stop();
    let stopped = std::time::Instant::now();
    let events = wait_for_closed_event(&server);
    // Measured, not asserted: detection (fall) + `after` (2 s) + the replacement's enrollment and first checks.
    println!(
        "service stopped -> replacement operational, event closed: {:?}",
        stopped.elapsed()
    );
    let event = &events[0];
    assert_eq!(events.as_array().unwrap().len(), 1, "{events}");
    assert_eq!(event["machine_id"], sick_id.as_str());
    assert_eq!(event["provider"], "local");
    assert!(
        event["reason"]
            .as_str()
            .unwrap()
            .starts_with("down for more than"),
        "{event}"
    );
    let replacement_id = event["replacement_machine_id"].as_str().unwrap().to_owned();
    let machines = server.machines();
    let replacement = machines
        .iter()
        .find(|machine| machine["id"] == replacement_id.as_str())
        .unwrap_or_else(|| panic!("{replacement_id} not in {machines:?}"));
    assert_eq!(replacement["zone"], "dc1");
    assert_eq!(
        replacement["labels"],
        serde_json::json!({"role": "web", "tier": "front"})
    );
    assert_eq!(replacement["state"], "operational");
    assert!(
        replacement["hostname"]
            .as_str()
            .unwrap()
            .starts_with("web-1-r"),
        "{replacement}"
    );

    // The sick machine is kept: enrolled, connected, quarantined, its agent untouched.
    let sick = server.ctl_json(&["machines", "show", "web-1"]);
    assert_eq!(sick["connected"], true, "{sick}");
    assert_eq!(sick["state"], "down", "{sick}");
    assert_eq!(sick["quarantine"]["by"], "remediation", "{sick}");
    assert!(sick["retired_at"].is_null(), "{sick}");
    assert!(agents[0].is_running() && agents[0].is_enrolled());
    let bundle = wait_for_forensics(&server, "web-1", &root.path().join("forensics"));
    let checks = bundle_file(&bundle, "checks.json");
    assert!(
        checks.contains(&dying_service.address.to_string()),
        "{checks}"
    );
    assert!(checks.contains("\"healthy\": false"), "{checks}");

    // Shutting the server down stops the agents its local provider started.
    let pids = replacement_pids(root.path());
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert!(process_alive(pids[0]));
    // The webhooks heard the event open and close.
    let remediation_alerts = || -> Vec<String> {
        webhook
            .received()
            .iter()
            .filter(|alert| alert["kind"] == "remediation")
            .map(|alert| alert["state"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(
        wait_until(LONG, || remediation_alerts() == ["requested", "closed"]),
        "{:?}",
        webhook.received()
    );
    server.terminate(Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(20), || !process_alive(pids[0])),
        "replacement agent {} still runs",
        pids[0]
    );
    for agent in &mut agents {
        agent.terminate(Duration::from_secs(10));
    }
}

#[test]
fn the_breaker_stops_remediation_while_a_zone_is_partitioned_and_closes_when_it_returns() {
    let root = TempDir::new("flotte-breaker").unwrap();
    let webhook = WebhookReceiver::start();
    let replacement_config = root.path().join("replacement-agent.toml");
    std::fs::write(&replacement_config, "").unwrap();
    let server = server_with(root.path(), |address| {
        format!(
            "[[webhook]]\nurl = \"{}\"\ntimeout = \"2s\"\n\n{}",
            webhook.url,
            remediation_settings(root.path(), address, "", &replacement_config)
        )
    });
    let mut agents = start_agents(
        &server,
        root.path(),
        &[
            ("a-1", "role=app", "dc1", String::new()),
            ("a-2", "role=app", "dc1", String::new()),
            ("b-1", "role=app", "dc2", String::new()),
            ("b-2", "role=app", "dc2", String::new()),
        ],
    );
    assert!(
        wait_until(LONG, || operational_count(&server) == 4),
        "{:?}",
        server.machines()
    );

    // dc1 is cut off: both its agents stop at once.
    for agent in agents.iter_mut().take(2) {
        agent.kill();
    }
    let mut status = serde_json::Value::Null;
    assert!(
        wait_until(LONG, || {
            status = server.ctl_json(&["status"]);
            status["remediation"]["breaker_open"] == true
        }),
        "{status}"
    );
    let reasons = status["remediation"]["breaker_reasons"].to_string();
    assert!(
        reasons.contains("zone dc1: 2 of 2 machines unhealthy"),
        "{reasons}"
    );
    let text = String::from_utf8_lossy(&server.ctl(&["status"]).stdout).into_owned();
    assert!(text.contains("breaker OPEN"), "{text}");
    // Well past the rule's threshold (2 s) and many rounds (500 ms): nothing is remediated.
    let unreachable_since = |server: &Server| -> Vec<String> {
        server
            .machines()
            .iter()
            .filter(|machine| machine["state"] == "unreachable")
            .filter_map(|machine| machine["state_since"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(unreachable_since(&server).len(), 2);
    let waited_from = std::time::Instant::now();
    assert!(wait_until(LONG, || waited_from.elapsed()
        > Duration::from_secs(6)
        && server.ctl_json(&["status"])["remediation"]["breaker_open"]
            == true));
    assert_eq!(
        server.ctl_json(&["remediation", "list"]),
        serde_json::json!([])
    );
    assert!(server
        .machines()
        .iter()
        .all(|machine| machine["quarantine"].is_null()));
    assert!(!root.path().join("replacements").exists());

    // The partition heals: the breaker closes, and the webhook saw both.
    for agent in agents.iter_mut().take(2) {
        agent.start();
    }
    assert!(
        wait_until(LONG, || operational_count(&server) == 4),
        "{:?}",
        server.machines()
    );
    assert!(wait_until(LONG, || server.ctl_json(&["status"])
        ["remediation"]["breaker_open"]
        == false));
    assert!(
        wait_until(LONG, || webhook
            .received()
            .iter()
            .filter(|alert| alert["kind"] == "remediation_breaker")
            .count()
            >= 2),
        "{:?}",
        webhook.received()
    );
    let breaker_alerts: Vec<bool> = webhook
        .received()
        .iter()
        .filter(|alert| alert["kind"] == "remediation_breaker")
        .map(|alert| alert["open"].as_bool().unwrap())
        .collect();
    assert_eq!(breaker_alerts, [true, false]);
    assert_eq!(
        server.ctl_json(&["remediation", "list"]),
        serde_json::json!([])
    );
}

/// Kills (SIGKILL) the process whose pid a provider script wrote, when dropped.
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

#[test]
fn the_command_provider_gets_the_machine_and_a_token_and_its_machine_closes_the_event() {
    let root = TempDir::new("flotte-command-provider").unwrap();
    let work = root.path().join("provider");
    std::fs::create_dir_all(&work).unwrap();
    let _replacement = KillOnDrop(work.join("replacement.pid"));
    let script = root.path().join("provision.sh");
    let server = server_with(root.path(), |address| {
        // Stands in for a cloud API: reads the machine, starts a machine that
        // enrolls with the token from its environment.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nset -e\ncat > {work}/request.json\n\
                 {agent} run --data-dir {work}/replacement --server {address} --hostname replacement-1 \
                 --report-interval 1s --reconnect-max-backoff 1s > {work}/replacement.log 2>&1 &\n\
                 echo $! > {work}/replacement.pid\necho \"started replacement-1\"\n",
                work = work.display(),
                agent = binary("flotte-agent").display(),
            ),
        )
        .unwrap();
        format!(
            "[remediation]\ninterval = \"500ms\"\n\n\
             [[remediation.rule]]\nselector = \"role=api\"\nafter = \"2s\"\nprovider = \"cloud\"\n\n\
             [[remediation.provider]]\nname = \"cloud\"\nkind = \"command\"\ncommand = \"/bin/sh\"\n\
             args = [\"{}\"]\ntimeout = \"30s\"\n",
            script.display()
        )
    });
    let mut agents = start_agents(
        &server,
        root.path(),
        &[
            ("api-1", "role=api", "dc2", String::new()),
            ("api-2", "role=api", "dc2", String::new()),
            ("api-3", "role=api", "dc2", String::new()),
        ],
    );
    assert!(
        wait_until(LONG, || operational_count(&server) == 3),
        "{:?}",
        server.machines()
    );
    // api-2's machine dies: unreachable, then replaced through the command.
    agents[1].kill();
    let events = wait_for_closed_event(&server);
    assert_eq!(events[0]["hostname"], "api-2");
    assert_eq!(events[0]["detail"], "started replacement-1");
    assert!(events[0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("unreachable for more than"));
    let request: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("request.json")).unwrap()).unwrap();
    assert_eq!(request["hostname"], "api-2");
    assert_eq!(request["zone"], "dc2");
    assert_eq!(request["labels"], serde_json::json!({"role": "api"}));
    assert_eq!(request["state"], "unreachable");
    assert!(
        request.get("join_token").is_none(),
        "the token travels in the environment only"
    );
    let replacement = machine(&server, "replacement-1");
    assert_eq!(replacement["id"], events[0]["replacement_machine_id"]);
    assert_eq!(replacement["zone"], "dc2");
    assert_eq!(replacement["labels"], serde_json::json!({"role": "api"}));
    assert_eq!(machine(&server, "api-2")["quarantine"]["by"], "remediation");
    for agent in &mut agents {
        agent.terminate(Duration::from_secs(10));
    }
}
