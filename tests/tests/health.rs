//! End-to-end tests of health: real checks against real services, machine
//! states on the server, transitions in history, watch streams and webhooks,
//! liveness, `/metrics` of server and agent — all with the real binaries.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotte_tests::{
    binary, sample_value, scrape, wait_until, Agent, Server, TempDir, TestHttpService,
    WebhookReceiver,
};

fn machine(server: &Server, hostname: &str) -> serde_json::Value {
    server.ctl_json(&["machines", "show", hostname])
}

fn state_of(server: &Server, hostname: &str) -> String {
    server
        .machines()
        .into_iter()
        .find(|machine| machine["hostname"] == hostname)
        .and_then(|machine| machine["state"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn wait_state(server: &Server, hostname: &str, state: &str, timeout: Duration) -> bool {
    wait_until(timeout, || state_of(server, hostname) == state)
}

/// Starts a server reporting every second (so unreachable after 3 s).
fn fast_server(root: &std::path::Path) -> Server {
    let mut server = Server::init(root, "server", &[]).with_run_args(&[
        "--report-interval",
        "1s",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    server.start();
    server
}

#[test]
fn an_http_check_follows_a_real_service_and_every_transition_is_announced_in_order() {
    let root = TempDir::new("flotte-health").unwrap();
    let webhook = WebhookReceiver::start();
    let mut server =
        Server::init(root.path(), "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.append_config(&format!(
        "[[webhook]]\nurl = \"{}\"\ntimeout = \"2s\"\n",
        webhook.url
    ));
    server.start();
    let mut service = TestHttpService::start();
    let token = server.token("role=web", "dc1", &[]);
    let interval_ms = 200;
    let fall = 3;
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token).with_config(&format!(
        "[[check]]\nname = \"web\"\nkind = \"http\"\nurl = \"http://{}/health\"\ninterval = \"{interval_ms}ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = {fall}\ncritical = true\n",
        service.address
    ));
    agent.start();
    assert!(
        wait_state(&server, "web-1", "operational", Duration::from_secs(30)),
        "{}",
        agent.log()
    );

    // A live watch sees what follows.
    let mut watch = Command::new(binary("flottectl"))
        .arg("--profile")
        .arg(server.admin_profile())
        .args([
            "--server",
            &server.address,
            "machines",
            "watch",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let watch_lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let sink = std::sync::Arc::clone(&watch_lines);
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(value) = serde_json::from_str(&line) {
                sink.lock().unwrap().push(value);
            }
        }
    });
    assert!(wait_until(Duration::from_secs(10), || !watch_lines
        .lock()
        .unwrap()
        .is_empty()));

    // Service killed: down within fall × interval plus slack for reporting.
    service.stop();
    let stopped = Instant::now();
    assert!(
        wait_state(&server, "web-1", "down", Duration::from_secs(10)),
        "{}",
        agent.log()
    );
    let detected = stopped.elapsed();
    let budget = Duration::from_millis(fall * interval_ms) + Duration::from_secs(2);
    println!("service stop -> machine down: {detected:?} (budget {budget:?})");
    assert!(
        detected < budget,
        "down after {detected:?}, budget {budget:?}"
    );
    let shown = machine(&server, "web-1");
    assert!(
        shown["state_reason"]
            .as_str()
            .unwrap()
            .contains("critical check web failing"),
        "{shown}"
    );
    assert_eq!(shown["checks"][0]["healthy"], false);

    // Restarted: operational again after `rise` passes.
    service.restart();
    assert!(
        wait_state(&server, "web-1", "operational", Duration::from_secs(10)),
        "{}",
        agent.log()
    );

    // History, webhook and watch all saw the same transitions, in order.
    let expected = [
        ("unknown", "operational"),
        ("operational", "down"),
        ("down", "operational"),
    ];
    let history: Vec<(String, String)> = machine(&server, "web-1")["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|t| {
            (
                t["from"].as_str().unwrap().to_owned(),
                t["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    fn pairs(list: &[(String, String)]) -> Vec<(&str, &str)> {
        list.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
    }
    assert_eq!(pairs(&history), expected.to_vec());
    assert!(
        wait_until(Duration::from_secs(10), || webhook.received().len() >= 3),
        "webhook got {:?}",
        webhook.received()
    );
    let posted: Vec<(String, String)> = webhook
        .received()
        .iter()
        .map(|alert| {
            (
                alert["from"].as_str().unwrap().to_owned(),
                alert["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(pairs(&posted), expected.to_vec());
    let first = &webhook.received()[0];
    assert_eq!(first["kind"], "machine_state");
    assert_eq!(first["hostname"], "web-1");
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert!(wait_until(Duration::from_secs(5), || watch_lines
        .lock()
        .unwrap()
        .len()
        >= 3));
    let watched: Vec<(String, String)> = watch_lines
        .lock()
        .unwrap()
        .iter()
        .filter(|event| event["snapshot"] == false)
        .map(|event| {
            (
                event["from"].as_str().unwrap_or("").to_owned(),
                event["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(pairs(&watched), expected[1..].to_vec());
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn failing_exec_checks_and_thresholds_degrade_and_silence_makes_unreachable() {
    let root = TempDir::new("flotte-health").unwrap();
    let server = fast_server(root.path());
    let exec_token = server.token("role=batch", "dc1", &[]);
    let mut exec_agent = Agent::new(root.path(), "batch-1", &server.address, &exec_token).with_config(
        "[[check]]\nname = \"queue\"\nkind = \"exec\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"echo queue depth 9000 over limit; exit 1\"]\ninterval = \"300ms\"\ntimeout = \"300ms\"\ncritical = false\n",
    );
    let disk_token = server.token("role=db", "dc2", &[]);
    let mut disk_agent = Agent::new(root.path(), "db-1", &server.address, &disk_token).with_config(
        "[system]\nmounts = [\"/\"]\ninterval = \"300ms\"\ndisk_used_percent_max = 0.0\n",
    );
    exec_agent.start();
    disk_agent.start();

    assert!(
        wait_state(&server, "batch-1", "degraded", Duration::from_secs(30)),
        "{}",
        exec_agent.log()
    );
    let shown = server.ctl(&["machines", "show", "batch-1"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("queue depth 9000 over limit"), "{text}");
    assert!(text.contains("exit status: 1"), "{text}");
    let json = machine(&server, "batch-1");
    assert!(json["checks"][0]["last_output"]
        .as_str()
        .unwrap()
        .contains("queue depth 9000"));
    assert_eq!(json["checks"][0]["critical"], false);

    assert!(
        wait_state(&server, "db-1", "degraded", Duration::from_secs(30)),
        "{}",
        disk_agent.log()
    );
    let db = machine(&server, "db-1");
    assert!(
        db["state_reason"].as_str().unwrap().contains("disk /:"),
        "{db}"
    );
    assert!(db["metrics"]["disks"][0]["total_bytes"].as_u64().unwrap() > 0);

    // Status counts per state, per zone and per role.
    let status = server.ctl_json(&["status", "--by", "role"]);
    assert_eq!(status["fleet"]["machines"], 2);
    assert_eq!(status["fleet"]["states"]["degraded"], 2);
    let roles: Vec<&str> = status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["batch", "db"]);
    assert_eq!(status["zones"].as_array().unwrap().len(), 2);

    // Silence: unreachable after the grace period (3 report intervals), back on restart.
    disk_agent.kill();
    let killed = Instant::now();
    assert!(wait_state(
        &server,
        "db-1",
        "unreachable",
        Duration::from_secs(15)
    ));
    println!(
        "agent killed -> unreachable: {:?} (grace 3 s)",
        killed.elapsed()
    );
    // The grace counts from the last report, which reached the server up
    // to one report interval (1 s, and a late timer's tick) before the kill.
    assert!(
        killed.elapsed() + Duration::from_millis(1250) >= Duration::from_secs(3),
        "unreachable before the grace period: {:?} after the kill",
        killed.elapsed()
    );
    disk_agent.start();
    assert!(
        wait_state(&server, "db-1", "degraded", Duration::from_secs(30)),
        "{}",
        disk_agent.log()
    );
    let history = machine(&server, "db-1")["transitions"]
        .as_array()
        .unwrap()
        .clone();
    assert!(history.iter().any(
        |t| t["to"] == "unreachable" && t["reason"].as_str().unwrap().contains("no report for")
    ));
}

#[test]
fn metrics_of_server_and_agent_parse_and_reports_cause_no_store_writes() {
    let root = TempDir::new("flotte-health").unwrap();
    let server = fast_server(root.path());
    let mut service = TestHttpService::start();
    let token = server.token("role=web", "dc3", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token).with_config(&format!(
        "metrics_listen = \"127.0.0.1:0\"\n[[check]]\nname = \"web\"\nkind = \"http\"\nurl = \"http://{}/\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n",
        service.address
    ));
    agent.start();
    assert!(
        wait_state(&server, "web-1", "operational", Duration::from_secs(30)),
        "{}",
        agent.log()
    );

    let server_metrics = scrape(&server.metrics_address().unwrap());
    assert_eq!(
        sample_value(
            &server_metrics,
            "flotte_machines",
            &[("state", "operational"), ("zone", "dc3")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample_value(&server_metrics, "flotte_connected_agents", &[]),
        Some(1.0)
    );
    assert!(
        sample_value(
            &server_metrics,
            "flotte_rpc_requests_total",
            &[("method", "/flotte.v1.Machines/ListMachines")]
        )
        .unwrap()
            >= 1.0
    );
    assert!(server_metrics.samples.iter().any(|sample| {
        sample.metric == "flotte_rpc_duration_seconds"
            && matches!(sample.value, prometheus_parse::Value::Histogram(_))
    }));
    assert!(sample_value(&server_metrics, "flotte_store_writes_total", &[]).unwrap() >= 1.0);
    // The allocator's own figures (jemalloc, read at the scrape): the live
    // data of a running server, inside the pages the allocator holds.
    let allocated = sample_value(&server_metrics, "flotte_allocator_allocated_bytes", &[])
        .expect("the allocator's allocated bytes");
    let resident = sample_value(&server_metrics, "flotte_allocator_resident_bytes", &[])
        .expect("the allocator's resident bytes");
    assert!(
        allocated > 1024.0 * 1024.0 && allocated < 1024.0 * 1024.0 * 1024.0,
        "{allocated}"
    );
    assert!(resident >= allocated, "{resident} < {allocated}");
    assert!(sample_value(&server_metrics, "flotte_allocator_retained_bytes", &[]).is_some());

    let agent_address = agent.metrics_address().unwrap();
    let agent_metrics = scrape(&agent_address);
    assert_eq!(
        sample_value(
            &agent_metrics,
            "flotte_agent_check_healthy",
            &[("check", "web")]
        ),
        Some(1.0)
    );
    assert!(
        sample_value(
            &agent_metrics,
            "flotte_agent_check_runs_total",
            &[("check", "web"), ("result", "pass")]
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        sample_value(&agent_metrics, "flotte_agent_session_connected", &[]),
        Some(1.0)
    );

    // Reports every second, checks every 200 ms, no state change: the store
    // must not be written (last-seen is flushed every 30 s, not per report).
    let writes_before = sample_value(
        &scrape(&server.metrics_address().unwrap()),
        "flotte_store_writes_total",
        &[],
    )
    .unwrap();
    // Wait for the server to have received several reports (counted in its
    // own metrics), then check that none of them wrote to the store.
    let reports_received = || {
        sample_value(
            &scrape(&server.metrics_address().unwrap()),
            "flotte_agent_reports_total",
            &[],
        )
        .unwrap()
    };
    let reports_before = reports_received();
    assert!(
        wait_until(Duration::from_secs(15), || reports_received()
            >= reports_before + 3.0),
        "the server counted no new reports: {}",
        agent.log()
    );
    let writes_after = sample_value(
        &scrape(&server.metrics_address().unwrap()),
        "flotte_store_writes_total",
        &[],
    )
    .unwrap();
    assert_eq!(writes_after, writes_before, "reports caused store writes");

    // A failing check shows up in the agent's own metrics.
    service.stop();
    assert!(wait_until(Duration::from_secs(10), || {
        sample_value(
            &scrape(&agent_address),
            "flotte_agent_check_healthy",
            &[("check", "web")],
        ) == Some(0.0)
    }));
}

#[test]
fn bad_check_definitions_are_refused_at_start_with_every_problem() {
    let root = TempDir::new("flotte-health").unwrap();
    let mut agent = Agent::new(root.path(), "bad", "127.0.0.1:9", "").with_config(
        "[[check]]\nname = \"zero\"\nkind = \"exec\"\ncommand = \"/bin/true\"\ninterval = \"0s\"\n\n[[check]]\nname = \"odd\"\nkind = \"carrier-pigeon\"\n\n[[check]]\nname = \"url\"\nkind = \"http\"\nurl = \"http//broken\"\n",
    );
    agent.start();
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent exits");
    assert_eq!(status.code(), Some(2), "{}", agent.log());
    let log = agent.log();
    for expected in [
        "check \"zero\": interval = \"0s\" is too short",
        "check \"odd\": unknown kind \"carrier-pigeon\"",
        "check \"url\": URL \"http//broken\" is not http(s)://",
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
}
