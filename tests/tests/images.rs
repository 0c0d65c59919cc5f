//! End-to-end tests of images: signed build and push, swaps on a real agent
//! running a real sample service, health-gated commit, automatic rollback,
//! and the refusals that must leave the running image untouched.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotte_tests::{binary, http_get, wait_until, Agent, Server, TempDir};

use flotte_tests::sample_fleet::{ctl_ok, free_port};

/// Builds `app@version` from the sample service, serving on `port`.
fn build_sample_image(
    root: &Path,
    server: &Server,
    version: &str,
    port: u16,
    healthy: bool,
) -> PathBuf {
    let tree = root.join(format!("tree-{version}"));
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::copy(binary("flotte-sample-service"), tree.join("bin/app")).unwrap();
    std::fs::write(tree.join("VERSION"), version).unwrap();
    let checks = root.join("checks.toml");
    std::fs::write(
        &checks,
        format!("[[check]]\nname = \"http\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/health\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n"),
    )
    .unwrap();
    let mut service = format!("bin/app --port {port} --version v{version}");
    if !healthy {
        service.push_str(" --unhealthy");
    }
    let out = root.join(format!("app-{version}.flotte"));
    let key = root.join("keys/release.key");
    ctl_ok(
        server,
        &[
            "image",
            "build",
            tree.to_str().unwrap(),
            "--name",
            "app",
            "--version",
            version,
            "--key",
            key.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--service",
            &service,
            "--checks",
            checks.to_str().unwrap(),
        ],
    );
    out
}

fn machine(server: &Server, hostname: &str) -> serde_json::Value {
    server.ctl_json(&["machines", "show", hostname])
}

fn wait_for(
    server: &Server,
    hostname: &str,
    timeout: Duration,
    condition: impl Fn(&serde_json::Value) -> bool,
) -> bool {
    wait_until(timeout, || condition(&machine(server, hostname)))
}

/// A running server and a release key pair in `<root>/keys` that it trusts.
fn server_trusting_a_new_release_key() -> (TempDir, Server, PathBuf) {
    let root = TempDir::new("flotte-images").unwrap();
    let mut server =
        Server::init(root.path(), "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.start();
    let keys = root.path().join("keys");
    ctl_ok(
        &server,
        &["image", "keygen", "--out", keys.to_str().unwrap()],
    );
    let public = keys.join("release.pub");
    ctl_ok(
        &server,
        &["image", "trust", "add", public.to_str().unwrap()],
    );
    (root, server, keys)
}

#[test]
fn swaps_commit_when_healthy_roll_back_when_not_and_refuse_downgrades() {
    let (root, server, keys) = server_trusting_a_new_release_key();
    let port = free_port();
    for (version, healthy) in [("1.0.0", true), ("2.0.0", true), ("3.0.0", false)] {
        let file = build_sample_image(root.path(), &server, version, port, healthy);
        let pushed = server.ctl_json(&["image", "push", file.to_str().unwrap()]);
        assert_eq!(pushed[0]["version"], version);
    }
    assert_eq!(
        server
            .ctl_json(&["image", "list"])
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let shown = server.ctl_json(&["image", "show", "app@2.0.0"]);
    assert_eq!(shown["manifest"]["service"]["command"][0], "bin/app");

    let token = server.token("role=web", "dc1", &[]);
    let mut agent =
        Agent::new(root.path(), "web-1", &server.address, &token).with_config(&format!(
            "[images]\nrelease_keys = [\"{}\"]\nverify_deadline = \"15s\"\nsoak = \"1s\"\n",
            keys.join("release.pub").display()
        ));
    agent.start();
    assert!(
        wait_until(Duration::from_secs(30), || server.connected_count() == 1),
        "{}",
        agent.log()
    );
    let service = format!("127.0.0.1:{port}");

    // v1 then v2: committed, the service answers the new version.
    for version in ["1.0.0", "2.0.0"] {
        ctl_ok(
            &server,
            &["machines", "set-image", "web-1", &format!("app@{version}")],
        );
        assert!(
            wait_for(&server, "web-1", Duration::from_secs(60), |m| m
                ["current_image"]
                == format!("app@{version}")),
            "{}\n{}",
            machine(&server, "web-1"),
            agent.log()
        );
        let (_, body) = http_get(&service, "/").unwrap();
        assert_eq!(body.trim(), format!("v{version}"));
    }
    let after_v2 = machine(&server, "web-1");
    assert_eq!(after_v2["previous_image"], "app@1.0.0");
    assert_eq!(after_v2["last_swap"]["outcome"], "committed");

    // v3 fails its health check: the agent rolls back to v2 by itself.
    ctl_ok(&server, &["machines", "set-image", "web-1", "app@3.0.0"]);
    assert!(
        wait_for(&server, "web-1", Duration::from_secs(60), |m| m
            ["last_swap"]["target"]
            == "app@3.0.0"
            && m["last_swap"]["outcome"] == "failed"),
        "{}\n{}",
        machine(&server, "web-1"),
        agent.log()
    );
    let failed = machine(&server, "web-1");
    assert_eq!(failed["current_image"], "app@2.0.0");
    assert_eq!(failed["last_swap"]["step"], "rolled_back");
    assert!(
        failed["last_swap"]["message"]
            .as_str()
            .unwrap()
            .contains("back on app@2.0.0, healthy"),
        "{failed}"
    );
    let (_, body) = http_get(&service, "/").unwrap();
    assert_eq!(body.trim(), "v2.0.0");

    // A downgrade is refused unless marked as a rollback.
    ctl_ok(&server, &["machines", "set-image", "web-1", "app@1.0.0"]);
    assert!(wait_for(&server, "web-1", Duration::from_secs(30), |m| m
        ["last_swap"]["target"]
        == "app@1.0.0"
        && m["last_swap"]["outcome"] == "failed"));
    let refused = machine(&server, "web-1");
    assert!(
        refused["last_swap"]["message"]
            .as_str()
            .unwrap()
            .contains("downgrade must be marked as a rollback"),
        "{refused}"
    );
    assert_eq!(refused["current_image"], "app@2.0.0");
    ctl_ok(
        &server,
        &["machines", "set-image", "web-1", "app@1.0.0", "--rollback"],
    );
    assert!(wait_for(&server, "web-1", Duration::from_secs(60), |m| m
        ["current_image"]
        == "app@1.0.0"));
    let (_, body) = http_get(&service, "/").unwrap();
    assert_eq!(body.trim(), "v1.0.0");
    // A clean stop also stops the supervised service.
    agent
        .process
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(10));
}

#[test]
fn unsigned_or_untrusted_images_are_refused_by_the_server_and_the_agent() {
    let root = TempDir::new("flotte-images").unwrap();
    let mut server =
        Server::init(root.path(), "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.start();
    let keys = root.path().join("keys");
    ctl_ok(
        &server,
        &["image", "keygen", "--out", keys.to_str().unwrap()],
    );
    let port = free_port();
    let file = build_sample_image(root.path(), &server, "1.0.0", port, true);
    // Not trusted yet: the server refuses the push, naming the key.
    let refused = server.ctl(&["image", "push", file.to_str().unwrap()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("not trusted here"), "{stderr}");
    ctl_ok(
        &server,
        &[
            "image",
            "trust",
            "add",
            keys.join("release.pub").to_str().unwrap(),
        ],
    );
    ctl_ok(&server, &["image", "push", file.to_str().unwrap()]);

    // An agent trusting another key refuses the image before touching anything.
    let other_keys = root.path().join("other-keys");
    ctl_ok(
        &server,
        &["image", "keygen", "--out", other_keys.to_str().unwrap()],
    );
    let token = server.token("role=web", "dc1", &[]);
    let mut agent =
        Agent::new(root.path(), "web-1", &server.address, &token).with_config(&format!(
            "[images]\nrelease_keys = [\"{}\"]\n",
            other_keys.join("release.pub").display()
        ));
    agent.start();
    assert!(
        wait_until(Duration::from_secs(30), || server.connected_count() == 1),
        "{}",
        agent.log()
    );
    ctl_ok(&server, &["machines", "set-image", "web-1", "app@1.0.0"]);
    assert!(
        wait_for(&server, "web-1", Duration::from_secs(30), |m| m
            ["last_swap"]["outcome"]
            == "failed"),
        "{}",
        agent.log()
    );
    let shown = machine(&server, "web-1");
    assert!(
        shown["last_swap"]["message"]
            .as_str()
            .unwrap()
            .contains("not trusted here"),
        "{shown}"
    );
    assert!(shown["current_image"].is_null());
    assert!(!agent.data_dir.join("images/current").exists());
    assert!(
        std::fs::read_dir(agent.data_dir.join("downloads"))
            .unwrap()
            .next()
            .is_none(),
        "nothing downloaded"
    );
}

/// Kills the agent (SIGKILL) exactly at each journalled step of a swap v1 →
/// v2, then restarts it: it recovers to a committed image, finishes the swap
/// the desired state still asks for, and the service answers v2.
#[test]
fn an_agent_killed_at_any_swap_step_ends_on_a_committed_image() {
    let (root, server, keys) = server_trusting_a_new_release_key();
    let port = free_port();
    for version in ["1.0.0", "2.0.0"] {
        let file = build_sample_image(root.path(), &server, version, port, true);
        ctl_ok(&server, &["image", "push", file.to_str().unwrap()]);
    }
    let hold_binary = flotte_tests::swap_hold_agent_binary();
    let service = format!("127.0.0.1:{port}");
    let steps = [
        "downloading",
        "verifying_payload",
        "unpacking",
        "switching",
        "restarting",
        "verifying",
        "committing",
    ];
    // Every step, twice: a crash must be harmless however often it happens.
    let rounds = steps.iter().chain(steps.iter()).enumerate();
    for (index, step) in rounds {
        let name = format!("web-{index}");
        let token = server.token("role=web", "dc1", &[]);
        let mut agent =
            Agent::new(root.path(), &name, &server.address, &token).with_config(&format!(
                "[images]\nrelease_keys = [\"{}\"]\nverify_deadline = \"15s\"\nsoak = \"500ms\"\n",
                keys.join("release.pub").display()
            ));
        agent.binary = Some(hold_binary.clone());
        agent.start();
        assert!(
            wait_until(Duration::from_secs(30), || server.connected_count() == 1),
            "{}",
            agent.log()
        );
        ctl_ok(&server, &["machines", "set-image", &name, "app@1.0.0"]);
        assert!(
            wait_for(&server, &name, Duration::from_secs(60), |m| m
                ["current_image"]
                == "app@1.0.0"),
            "{}",
            agent.log()
        );
        // Held at `step` on the way to v2, then killed there.
        agent.kill();
        agent.environment = vec![("FLOTTE_HOLD_AT_STEP".into(), (*step).into())];
        agent.start();
        ctl_ok(&server, &["machines", "set-image", &name, "app@2.0.0"]);
        assert!(
            wait_until(Duration::from_secs(60), || agent
                .log()
                .lines()
                .any(|line| line.contains("holding at swap step")
                    && line.contains(&format!("step=\"{step}\"")))),
            "never held at {step}:\n{}",
            agent.log()
        );
        agent.kill();
        agent.environment.clear();
        agent.start();
        // Recovery leaves a committed image (v1 when the attempt is undone, v2
        // when the commit is finished); the desired state still says v2, so
        // the agent then completes the swap.
        let settled = wait_for(&server, &name, Duration::from_secs(60), |m| {
            m["current_image"] == "app@2.0.0" && m["last_swap"]["outcome"] == "committed"
        });
        let shown = machine(&server, &name);
        assert!(settled, "after a kill at {step}: {shown}\n{}", agent.log());
        let version = shown["current_image"]
            .as_str()
            .unwrap()
            .trim_start_matches("app@")
            .to_owned();
        assert!(
            wait_until(Duration::from_secs(20), || http_get(&service, "/")
                .is_ok_and(|(_, body)| body.trim() == format!("v{version}"))),
            "after a kill at {step} the service does not answer v{version}"
        );
        println!("killed at {step}: ended committed on app@{version}");
        // A clean stop also stops the supervised service and frees the port.
        agent
            .process
            .as_mut()
            .unwrap()
            .terminate(Duration::from_secs(10));
        assert!(wait_until(Duration::from_secs(10), || server
            .connected_count()
            == 0));
    }
}
