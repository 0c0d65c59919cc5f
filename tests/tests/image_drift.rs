//! End-to-end tests of image integrity (issue 18): a real server and a real
//! agent running a signed image of the sample service; files of the running
//! tree are edited in place; `flottectl machines verify` names every
//! difference, the machine turns degraded, `drift report` lists it, and a
//! restore (on demand, or by the agent itself with `on_drift = "restore"`)
//! brings back the signed tree, keeps the drifted one, and the machine is
//! operational again with its service still serving.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotte_tests::sample_fleet::{
    build_sample_image_with, free_port, write_incompressible_tree, SampleImage,
};
use flotte_tests::{http_get, wait_until, Agent, Server, TempDir};

/// A server (with `server_config` appended to its settings) trusting a
/// fresh release key, `app@1.0.0` pushed (the sample service on `port`, plus
/// `etc/config`, a symlink `bin/app-link -> app`, a mutable `var/` and
/// `data_mib` MiB of data), and an agent with `extra_images_config`
/// committed on it.
fn agent_running_the_image(
    server_config: &str,
    extra_images_config: &str,
    data_mib: u64,
) -> (TempDir, Server, Agent, u16) {
    let root = TempDir::new("flotte-drift").unwrap();
    let mut server = Server::init(root.path(), "server", &[]).with_run_args(&[
        "--report-interval",
        "1s",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    server.append_config(server_config);
    server.start();
    let keys = root.path().join("keys");
    server.ctl_ok(&["image", "keygen", "--out", keys.to_str().unwrap()]);
    server.ctl_ok(&[
        "image",
        "trust",
        "add",
        keys.join("release.pub").to_str().unwrap(),
    ]);
    let tree = root.path().join("tree-1.0.0");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::create_dir_all(tree.join("var")).unwrap();
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("etc/config"), "answer = 42\n").unwrap();
    std::fs::write(tree.join("var/state"), "first\n").unwrap();
    std::os::unix::fs::symlink("app", tree.join("bin/app-link")).unwrap();
    write_incompressible_tree(&tree.join("data"), data_mib * 1024 * 1024, 4).unwrap();
    let port = free_port().unwrap();
    let image = build_sample_image_with(
        &server,
        root.path(),
        &keys,
        SampleImage {
            version: "1.0.0",
            port,
            extra_service_args: "",
            extra_build_args: &["--mutable", "var"],
        },
    );
    server.ctl_ok(&["image", "push", image.to_str().unwrap()]);
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token).with_config(&format!(
        "[images]\nrelease_keys = [\"{}\"]\nverify_deadline = \"15s\"\nsoak = \"500ms\"\nverify_interval = \"1h\"\n{extra_images_config}",
        keys.join("release.pub").display()
    ));
    agent.start();
    assert!(
        wait_until(Duration::from_secs(30), || server.connected_count() == 1),
        "{}",
        agent.log()
    );
    server.ctl_ok(&["machines", "set-image", "web-1", "app@1.0.0"]);
    assert!(
        wait_until(Duration::from_secs(60), || {
            let machine = server.ctl_json(&["machines", "show", "web-1"]);
            machine["current_image"] == "app@1.0.0" && machine["state"] == "operational"
        }),
        "{}\n{}",
        server.ctl_json(&["machines", "show", "web-1"]),
        agent.log()
    );
    (root, server, agent, port)
}

/// `flottectl machines verify TARGET -o json`: whether it exited 0, and the
/// verifications it printed.
fn verify(server: &Server, target: &str) -> (bool, Vec<serde_json::Value>) {
    let output = server.ctl(&[
        "machines",
        "verify",
        target,
        "--timeout",
        "60s",
        "-o",
        "json",
    ]);
    let printed: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "verify printed no JSON ({error}): {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
    (output.status.success(), printed.as_array().unwrap().clone())
}

fn current_tree(agent: &Agent) -> PathBuf {
    let images = agent.data_dir.join("images");
    images.join(std::fs::read_link(images.join("current")).unwrap())
}

/// Edits the running tree: every kind of drift, plus changes under the
/// mutable `var/` that must not count.
fn tamper_with(tree: &Path) {
    std::fs::write(tree.join("VERSION"), "hot-fixed by hand").unwrap();
    std::fs::remove_file(tree.join("etc/config")).unwrap();
    std::fs::write(tree.join("bin/extra"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(tree.join("bin/app"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::remove_file(tree.join("bin/app-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", tree.join("bin/app-link")).unwrap();
    std::fs::write(tree.join("var/state"), "second\n").unwrap();
    std::fs::write(tree.join("var/new"), "new\n").unwrap();
}

fn differences(verification: &serde_json::Value) -> Vec<(String, String)> {
    verification["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|difference| {
            (
                difference["path"].as_str().unwrap().to_owned(),
                difference["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn state_of(server: &Server) -> (String, String) {
    let machine = server.ctl_json(&["machines", "show", "web-1"]);
    (
        machine["state"].as_str().unwrap_or_default().to_owned(),
        machine["state_reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// The machine is operational again and its service answers v1.0.0.
fn assert_operational_and_serving(server: &Server, port: u16) {
    assert!(
        wait_until(Duration::from_secs(20), || state_of(server).0
            == "operational"),
        "{:?}",
        state_of(server)
    );
    let (_, body) = http_get(&format!("127.0.0.1:{port}"), "/").unwrap();
    assert_eq!(body.trim(), "v1.0.0");
}

#[test]
fn drift_is_found_named_degrades_the_machine_and_a_restore_brings_back_the_signed_tree() {
    let (_root, server, agent, port) = agent_running_the_image("", "", 0);
    let (clean, verifications) = verify(&server, "web-1");
    assert!(clean, "{verifications:?}\n{}", agent.log());
    assert_eq!(verifications.len(), 1);
    assert_eq!(verifications[0]["result"], "clean");
    assert!(verifications[0]["bytes_read"].as_u64().unwrap() > 0);

    tamper_with(&current_tree(&agent));
    // By selector this time: the same machine.
    let (clean, verifications) = verify(&server, "role=web");
    assert!(!clean, "drift must fail the command");
    assert_eq!(
        verifications.len(),
        1,
        "{verifications:?}\n{}\n{}",
        agent.log(),
        server.log()
    );
    let found = &verifications[0];
    assert_eq!(found["result"], "drift", "{found}");
    let expected: Vec<(String, String)> = [
        ("VERSION", "changed"),
        ("bin/app", "mode"),
        ("bin/app-link", "link"),
        ("bin/extra", "added"),
        ("etc/config", "removed"),
    ]
    .iter()
    .map(|(path, kind)| ((*path).to_owned(), (*kind).to_owned()))
    .collect();
    assert_eq!(differences(found), expected, "{found}");

    assert!(
        wait_until(Duration::from_secs(20), || state_of(&server).0
            == "degraded"),
        "{:?}",
        state_of(&server)
    );
    assert!(
        state_of(&server).1.contains("image drift: 5 files changed"),
        "{:?}",
        state_of(&server)
    );
    let report = server.ctl_json(&["drift", "report", "--selector", "role=web"]);
    assert_eq!(report.as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report[0]["hostname"], "web-1");
    assert_eq!(differences(&report[0]), expected);

    let restored = server.ctl(&[
        "machines",
        "restore-image",
        "web-1",
        "--timeout",
        "90s",
        "-o",
        "json",
    ]);
    let printed: serde_json::Value = serde_json::from_slice(&restored.stdout).unwrap();
    assert!(
        restored.status.success(),
        "{printed}\n{}\n{}",
        String::from_utf8_lossy(&restored.stderr),
        agent.log()
    );
    assert_eq!(printed[0]["result"], "clean", "{printed}");
    let kept = PathBuf::from(printed[0]["kept_tree"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(kept.join("VERSION")).unwrap(),
        "hot-fixed by hand",
        "the drifted tree is kept for forensics"
    );
    let tree = current_tree(&agent);
    assert_eq!(
        std::fs::read_to_string(tree.join("VERSION")).unwrap(),
        "1.0.0"
    );
    assert!(tree.join("etc/config").exists());
    assert!(!tree.join("bin/extra").exists());
    assert_eq!(
        std::fs::read_link(tree.join("bin/app-link")).unwrap(),
        Path::new("app")
    );
    assert_operational_and_serving(&server, port);
    let shown = server.ctl(&["machines", "show", "web-1"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("last verification"), "{shown}");
    assert!(shown.contains("clean (0 differing)"), "{shown}");

    // Image age: built just now, so not old under the default 30 days.
    let listed = server.ctl_json(&["machines", "list"]);
    assert!(
        listed[0]["current_image_created_at"].is_string(),
        "{listed}"
    );
    let status = server.ctl_json(&["status"]);
    assert_eq!(status["machines_on_old_images"], 0, "{status}");
    assert_eq!(status["image_max_age_days"], 30, "{status}");
}

#[test]
fn with_on_drift_restore_the_agent_repairs_its_image_by_itself() {
    let (_root, server, agent, port) =
        agent_running_the_image("image_max_age = \"1s\"\n", "on_drift = \"restore\"\n", 0);
    tamper_with(&current_tree(&agent));
    let (clean, verifications) = verify(&server, "web-1");
    assert!(clean, "{verifications:?}\n{}", agent.log());
    let repaired = &verifications[0];
    assert_eq!(repaired["result"], "clean", "{repaired}");
    assert!(
        repaired["restore_message"]
            .as_str()
            .unwrap()
            .contains("app@1.0.0 restored"),
        "{repaired}"
    );
    assert!(!repaired["kept_tree"].as_str().unwrap().is_empty());
    assert_eq!(
        std::fs::read_to_string(current_tree(&agent).join("VERSION")).unwrap(),
        "1.0.0"
    );
    assert_operational_and_serving(&server, port);

    // With image_max_age = 1s the image is old a second after it was built:
    // counted by `status` and by the gauge.
    assert!(
        wait_until(Duration::from_secs(10), || server.ctl_json(&["status"])
            ["machines_on_old_images"]
            == 1),
        "{}",
        server.ctl_json(&["status"])
    );
    let metrics = flotte_tests::scrape(&server.metrics_address().unwrap());
    assert_eq!(
        flotte_tests::sample_value(&metrics, "flotte_machines_on_old_images", &[]),
        Some(1.0)
    );
}

/// The server's count of agent reports received.
fn reports_received(server: &Server) -> f64 {
    let metrics = flotte_tests::scrape(&server.metrics_address().unwrap());
    flotte_tests::sample_value(&metrics, "flotte_agent_reports_total", &[]).unwrap()
}

#[test]
fn a_verification_keeps_to_its_rate_and_never_delays_the_reports() {
    const RATE: u64 = 4_000_000;
    let (_root, server, agent, _port) =
        agent_running_the_image("", &format!("verify_bytes_per_second = {RATE}\n"), 24);
    let reports_before = reports_received(&server);
    let started = std::time::Instant::now();
    let (clean, verifications) = verify(&server, "web-1");
    let elapsed = started.elapsed();
    let reports = reports_received(&server) - reports_before;
    assert!(clean, "{verifications:?}\n{}", agent.log());
    let verification = &verifications[0];
    let bytes = verification["bytes_read"].as_u64().unwrap();
    let millis = verification["duration_ms"].as_u64().unwrap();
    assert!(bytes > 24 * 1024 * 1024, "{verification}");
    let throughput = bytes as f64 * 1000.0 / millis as f64;
    assert!(
        (throughput / RATE as f64 - 1.0).abs() <= 0.1,
        "{throughput:.0} B/s read at a {RATE} B/s limit ({verification})"
    );
    // One report a second throughout the verification (it took ~7 s).
    assert!(
        reports >= elapsed.as_secs_f64().floor() - 1.0,
        "{reports} reports in {elapsed:?} of verification"
    );
}
