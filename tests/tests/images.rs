//! End-to-end tests of images: signed build and push, swaps on a real agent
//! running a real sample service, health-gated commit, automatic rollback,
//! and the refusals that must leave the running image untouched.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotte_tests::{http_get, wait_until, Agent, Server, TempDir};

use flotte_tests::sample_fleet::{build_sample_image_on_port, free_port};

/// Builds `app@version` from the sample service, serving on `port`.
fn build_sample_image(
    root: &Path,
    server: &Server,
    version: &str,
    port: u16,
    healthy: bool,
) -> PathBuf {
    let extra = if healthy { "" } else { " --unhealthy" };
    build_sample_image_on_port(server, root, &root.join("keys"), version, port, extra)
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
    let mut server = Server::init(root.path(), "server", &[]).with_run_args(&[
        "--report-interval",
        "1s",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    server.start();
    let keys = root.path().join("keys");
    server.ctl_ok(&["image", "keygen", "--out", keys.to_str().unwrap()]);
    let public = keys.join("release.pub");
    server.ctl_ok(&["image", "trust", "add", public.to_str().unwrap()]);
    (root, server, keys)
}

#[test]
fn swaps_commit_when_healthy_roll_back_when_not_and_refuse_downgrades() {
    let (root, server, keys) = server_trusting_a_new_release_key();
    let port = free_port().unwrap();
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

    // keep = 2: only current and previous stay unpacked.
    let mut agent = start_connected_agent(root.path(), &server, &keys, "keep = 2\n");
    let service = format!("127.0.0.1:{port}");

    // v1 then v2: committed, the service answers the new version.
    for version in ["1.0.0", "2.0.0"] {
        server.ctl_ok(&["machines", "set-image", "web-1", &format!("app@{version}")]);
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
    server.ctl_ok(&["machines", "set-image", "web-1", "app@3.0.0"]);
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

    // A downgrade is refused at the call, naming --rollback, unless marked
    // as a rollback (the agent would refuse it too, but only later).
    let refused = server.ctl(&["machines", "set-image", "web-1", "app@1.0.0"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("runs app@2.0.0")
            && stderr.contains("--rollback"),
        "{stderr}"
    );
    assert_eq!(machine(&server, "web-1")["desired_image"], "app@3.0.0");
    server.ctl_ok(&["machines", "set-image", "web-1", "app@1.0.0", "--rollback"]);
    assert!(wait_for(&server, "web-1", Duration::from_secs(60), |m| m
        ["current_image"]
        == "app@1.0.0"));
    let (_, body) = http_get(&service, "/").unwrap();
    assert_eq!(body.trim(), "v1.0.0");
    // The failed v3 was garbage-collected at the commit of v1; v2 is kept
    // as the previous image for an instant rollback.
    let digest_of = |reference: &str| {
        server.ctl_json(&["image", "show", reference])["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mut kept = vec![digest_of("app@1.0.0"), digest_of("app@2.0.0")];
    kept.sort();
    let unpacked: Vec<String> = unpacked_images(&agent)
        .into_iter()
        .filter(|name| name.len() == 64)
        .collect();
    assert_eq!(unpacked, kept, "v3 is collected beyond keep = 2");
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
    server.ctl_ok(&["image", "keygen", "--out", keys.to_str().unwrap()]);
    let port = free_port().unwrap();
    let file = build_sample_image(root.path(), &server, "1.0.0", port, true);
    // Not trusted yet: the server refuses the push, naming the key.
    let refused = server.ctl(&["image", "push", file.to_str().unwrap()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("not trusted here"), "{stderr}");
    server.ctl_ok(&[
        "image",
        "trust",
        "add",
        keys.join("release.pub").to_str().unwrap(),
    ]);
    server.ctl_ok(&["image", "push", file.to_str().unwrap()]);

    // An agent trusting another key refuses the image before touching anything.
    let other_keys = root.path().join("other-keys");
    server.ctl_ok(&["image", "keygen", "--out", other_keys.to_str().unwrap()]);
    let agent = start_connected_agent(root.path(), &server, &other_keys, "");
    server.ctl_ok(&["machines", "set-image", "web-1", "app@1.0.0"]);
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
    let port = free_port().unwrap();
    for version in ["1.0.0", "2.0.0"] {
        let file = build_sample_image(root.path(), &server, version, port, true);
        server.ctl_ok(&["image", "push", file.to_str().unwrap()]);
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
        server.ctl_ok(&["machines", "set-image", &name, "app@1.0.0"]);
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
        server.ctl_ok(&["machines", "set-image", &name, "app@2.0.0"]);
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

/// Pushes a hand-made payload (a plain tar, compressed here) signed with the
/// trusted release key in `keys`, as `app@version`.
fn push_sealed_payload(
    root: &Path,
    server: &Server,
    keys: &Path,
    version: &str,
    tar_bytes: &[u8],
) -> PathBuf {
    let payload = root.join(format!("payload-{version}.tar.zst"));
    std::fs::write(&payload, zstd::encode_all(tar_bytes, 3).unwrap()).unwrap();
    let out = root.join(format!("app-{version}.flotte"));
    flotte_common::image_build::seal_payload(
        &payload,
        &flotte_common::image_build::SealOptions {
            name: "app".into(),
            version: version.into(),
            key_pem: std::fs::read_to_string(keys.join("release.key")).unwrap(),
            service: None,
            checks: Vec::new(),
            mutable_paths: Vec::new(),
        },
        &out,
    )
    .unwrap();
    server.ctl_ok(&["image", "push", out.to_str().unwrap()]);
    out
}

/// Names in the agent's `images/` directory (unpacked images, `current`,
/// any staging left behind).
fn unpacked_images(agent: &Agent) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(agent.data_dir.join("images"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Agent `web-1` trusting the release key in `keys`, connected to `server`.
fn start_connected_agent(
    root: &Path,
    server: &Server,
    keys: &Path,
    extra_images_config: &str,
) -> Agent {
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root, "web-1", &server.address, &token).with_config(&format!(
        "[images]\nrelease_keys = [\"{}\"]\nverify_deadline = \"15s\"\nsoak = \"500ms\"\n{extra_images_config}",
        keys.join("release.pub").display()
    ));
    agent.start();
    assert!(
        wait_until(Duration::from_secs(30), || server.connected_count() == 1),
        "{}",
        agent.log()
    );
    agent
}

/// An agent trusting `keys`, committed on `app@1.0.0` (the sample service on `port`).
fn agent_committed_on_v1(
    root: &Path,
    server: &Server,
    keys: &Path,
    port: u16,
    extra_images_config: &str,
) -> Agent {
    let file = build_sample_image(root, server, "1.0.0", port, true);
    server.ctl_ok(&["image", "push", file.to_str().unwrap()]);
    let agent = start_connected_agent(root, server, keys, extra_images_config);
    server.ctl_ok(&["machines", "set-image", "web-1", "app@1.0.0"]);
    assert!(
        wait_for(server, "web-1", Duration::from_secs(60), |m| m
            ["current_image"]
            == "app@1.0.0"),
        "{}",
        agent.log()
    );
    agent
}

/// Sets `app@version`, waits for the agent to report that attempt failed
/// with a message containing `expected`, and checks that v1 still runs and
/// answers; returns the message.
fn swap_refused_with(
    server: &Server,
    agent: &Agent,
    version: &str,
    service: &str,
    expected: &str,
) -> String {
    let target = format!("app@{version}");
    server.ctl_ok(&["machines", "set-image", "web-1", &target]);
    assert!(
        wait_for(server, "web-1", Duration::from_secs(60), |m| m["last_swap"]
            ["target"]
            == target
            && m["last_swap"]["outcome"] == "failed"
            && m["last_swap"]["message"]
                .as_str()
                .is_some_and(|message| message.contains(expected))),
        "expected a refusal containing {expected:?}\n{}\n{}",
        machine(server, "web-1"),
        agent.log()
    );
    let shown = machine(server, "web-1");
    assert_eq!(shown["current_image"], "app@1.0.0", "{shown}");
    let (_, body) = http_get(service, "/").unwrap();
    assert_eq!(body.trim(), "v1.0.0", "the running service is untouched");
    shown["last_swap"]["message"].as_str().unwrap().to_owned()
}

#[test]
fn hostile_payloads_are_refused_by_name_and_the_running_image_is_untouched() {
    let (root, server, keys) = server_trusting_a_new_release_key();
    let port = free_port().unwrap();
    // Above the sample service binary of v1, which must still fit.
    let size_limit = 64 << 20;
    let agent = agent_committed_on_v1(
        root.path(),
        &server,
        &keys,
        port,
        &format!("max_unpacked_bytes = {size_limit}\n"),
    );
    let service = format!("127.0.0.1:{port}");
    let images_before = unpacked_images(&agent);
    assert_eq!(
        images_before.len(),
        4,
        "v1, its file index, `current` and the record of what is committed: {images_before:?}"
    );

    let payloads = flotte_tests::hostile_payloads::hostile_payloads(size_limit);
    assert_eq!(payloads.len(), 8);
    for (index, payload) in payloads.iter().enumerate() {
        let version = format!("1.1.{index}");
        push_sealed_payload(root.path(), &server, &keys, &version, &payload.tar_bytes);
        let message = swap_refused_with(
            &server,
            &agent,
            &version,
            &service,
            &payload.expected_refusal,
        );
        assert_eq!(
            unpacked_images(&agent),
            images_before,
            "{}: nothing of the refused image is left on disk",
            payload.case
        );
        let downloads: Vec<String> = std::fs::read_dir(agent.data_dir.join("downloads"))
            .map(|entries| {
                entries
                    .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            downloads.is_empty(),
            "{}: the refused payload is removed: {downloads:?}",
            payload.case
        );
        println!("{}: refused: {message}", payload.case);
    }
    assert!(!agent.data_dir.join("images/escaped.txt").exists());
    assert!(!agent.data_dir.join("escaped.txt").exists());
    assert!(!Path::new("/tmp/flotte-absolute.txt").exists());
}

fn image_bytes_served(server: &Server) -> u64 {
    let address = server.metrics_address().expect("server /metrics listening");
    let (_, body) = http_get(&address, "/metrics").unwrap();
    body.lines()
        .find_map(|line| line.strip_prefix("flotte_image_served_bytes_total "))
        .map(|value| value.trim().parse().unwrap())
        .unwrap_or(0)
}

/// A deterministic, incompressible filler (xorshift): makes the payload big
/// enough that a download has a middle.
fn incompressible_bytes(length: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn tampered_or_truncated_blobs_are_refused_and_a_cut_download_resumes_after_a_restart() {
    let (root, server, keys) = server_trusting_a_new_release_key();
    let port = free_port().unwrap();
    let service = format!("127.0.0.1:{port}");
    let mut agent = agent_committed_on_v1(root.path(), &server, &keys, port, "");

    // v2 carries 8 MiB that zstd cannot shrink.
    std::fs::create_dir_all(root.path().join("tree-2.0.0")).unwrap();
    std::fs::write(
        root.path().join("tree-2.0.0/filler.bin"),
        incompressible_bytes(8 << 20),
    )
    .unwrap();
    let file = build_sample_image(root.path(), &server, "2.0.0", port, true);
    server.ctl_ok(&["image", "push", file.to_str().unwrap()]);
    let digest = server.ctl_json(&["image", "show", "app@2.0.0"])["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let blob = server.data_dir.join("images/blobs").join(&digest);
    let original = std::fs::read(&blob).unwrap();
    let size = original.len() as u64;
    assert!(size > 8 << 20, "payload of {size} bytes");

    // One flipped byte on the server's disk: downloaded, refused on its
    // digest, the partial file dropped, nothing unpacked.
    let mut tampered = original.clone();
    tampered[original.len() / 2] ^= 0xff;
    std::fs::write(&blob, &tampered).unwrap();
    swap_refused_with(
        &server,
        &agent,
        "2.0.0",
        &service,
        &format!("the manifest says {digest}: refused"),
    );
    assert!(!agent.data_dir.join("images").join(&digest).exists());
    assert!(
        std::fs::read_dir(agent.data_dir.join("downloads"))
            .unwrap()
            .next()
            .is_none(),
        "a payload with the wrong digest is not kept"
    );

    // Half the blob: the short download is refused but kept, to be resumed.
    let half = size / 2;
    std::fs::write(&blob, &original[..half as usize]).unwrap();
    swap_refused_with(
        &server,
        &agent,
        "2.0.0",
        &service,
        &format!("the payload is {half} bytes, the manifest says {size}"),
    );
    let partial = agent
        .data_dir
        .join("downloads")
        .join(format!("{digest}.partial"));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), half);

    // The agent restarts once the server has the whole blob again: it asks
    // only for the missing half.
    agent.kill();
    std::fs::write(&blob, &original).unwrap();
    let served_before = image_bytes_served(&server);
    agent.start();
    assert!(
        wait_for(&server, "web-1", Duration::from_secs(60), |m| m
            ["current_image"]
            == "app@2.0.0"
            && m["last_swap"]["outcome"] == "committed"),
        "{}\n{}",
        machine(&server, "web-1"),
        agent.log()
    );
    let served_after_restart = image_bytes_served(&server) - served_before;
    println!(
        "payload {size} bytes, cut at {half}; after the restart the server sent {served_after_restart} bytes"
    );
    assert_eq!(served_after_restart, size - half);
    assert!(
        agent
            .log()
            .lines()
            .any(|line| line.contains("resuming image download")
                && line.contains(&format!("resume_from={half}"))),
        "{}",
        agent.log()
    );
    let (_, body) = http_get(&service, "/").unwrap();
    assert_eq!(body.trim(), "v2.0.0");
}
