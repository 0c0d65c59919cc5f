//! The Python integration in `examples/python/` run against a real server
//! with two real agents: it generates its stubs from `proto/`, connects with
//! an operator profile over mutual TLS, lists both machines and previews a
//! rollout of the committed `examples/plan.toml` with `dry_run`, which must
//! leave no rollout behind. It needs a Python 3.11+ with grpcio and
//! grpc_tools (`apt-get install python3-grpcio python3-grpc-tools`); without
//! one it fails, unless `FLOTTE_TEST_SKIP_PYTHON=1` asks to skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flotte_tests::sample_fleet::{
    push_sample_image, set_image_everywhere, start_sample_fleet, trust_new_release_key, Behaviour,
};
use flotte_tests::{Server, TempDir};

const SKIP_VARIABLE: &str = "FLOTTE_TEST_SKIP_PYTHON";
/// A Python to use instead of looking for one (`python3` on PATH, then
/// Debian's `/usr/bin/python3`, where `apt-get install` puts the modules).
const PYTHON_VARIABLE: &str = "FLOTTE_TEST_PYTHON";

/// (hostname, zone, labels): one machine for each of the plan's first two stages.
const MACHINES: [(&str, &str, &str); 2] = [("qa-1", "dc1", "env=qa"), ("web-1", "dc2", "env=prod")];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The first candidate Python that imports grpc and grpc_tools and has
/// tomllib (3.11+).
fn python_with_grpc() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os(PYTHON_VARIABLE) {
        Some(chosen) => vec![PathBuf::from(chosen)],
        None => vec![PathBuf::from("python3"), PathBuf::from("/usr/bin/python3")],
    };
    candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import grpc, grpc_tools.protoc, tomllib"])
            .output()
            .is_ok_and(|output| output.status.success())
    })
}

/// Runs the example as its README says, with the committed example plan.
fn run_example(python: &Path, profile: &Path, server: &str, image: &str) -> Output {
    Command::new(python)
        .arg(workspace_root().join("examples/python/flotte_example.py"))
        .arg("--profile")
        .arg(profile)
        .args(["--server", server, "--image", image, "--plan"])
        .arg(workspace_root().join("examples/plan.toml"))
        .output()
        .expect("run the Python example")
}

#[test]
fn the_python_example_lists_machines_and_previews_a_rollout() {
    let Some(python) = python_with_grpc() else {
        assert!(
            std::env::var(SKIP_VARIABLE).as_deref() == Ok("1"),
            "no Python 3.11+ with grpcio and grpc_tools (apt-get install python3-grpcio \
             python3-grpc-tools, or set {PYTHON_VARIABLE}); set {SKIP_VARIABLE}=1 to skip explicitly"
        );
        println!("SKIPPED ({SKIP_VARIABLE}=1): no Python with grpcio and grpc_tools");
        return;
    };

    let root = TempDir::new("flotte-python-example").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let keys = trust_new_release_key(&server, root.path());
    for version in ["1.0.0", "2.0.0"] {
        push_sample_image(&server, root.path(), &keys, version, Behaviour::Healthy);
    }
    // Both machines run app@1.0.0, healthy; the preview is of app@2.0.0.
    let mut machines = start_sample_fleet(&server, root.path(), &keys, &MACHINES);
    set_image_everywhere(&server, &machines, "1.0.0");
    // The integration's own operator, with the least role a dry run needs.
    let profile = server.create_operator(root.path(), "integration", "operator");

    let output = run_example(&python, &profile, &server.address, "app@2.0.0");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        python.display(),
        output.status
    );

    // Shown with --nocapture: what examples/python/README.md prints.
    println!("{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"machines (2):"), "{stdout}");
    for (name, zone, labels) in MACHINES {
        let listed = lines
            .iter()
            .find(|line| line.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not listed:\n{stdout}"));
        assert!(
            listed.contains("state=operational  connected")
                && listed.contains("image=app@1.0.0")
                && listed.contains(&format!("zone={zone}"))
                && listed.contains(&format!("labels={labels}")),
            "{listed}"
        );
    }
    // The plan's qualification stage takes qa-1, its canary web-1: one
    // machine per wave, in that order.
    assert!(
        stdout.contains("dry run: app@2.0.0 on 2 machines in 2 waves (dry_run=true"),
        "{stdout}"
    );
    assert!(stdout.contains("  wave 0: qa-1 (zone dc1)"), "{stdout}");
    assert!(stdout.contains("  wave 1: web-1 (zone dc2)"), "{stdout}");
    assert!(
        stdout.contains("  stage qualification: selector=env=qa machines=1 waves=1"),
        "{stdout}"
    );

    // A preview: the server holds no rollout afterwards.
    let rollouts = server.ctl_json(&["rollout", "list"]);
    assert_eq!(
        rollouts,
        serde_json::json!([]),
        "the dry run started a rollout"
    );

    // A refusal is said with the server's status code, exit status 1: the
    // same call for an image that was never pushed.
    let refused = run_example(&python, &profile, &server.address, "app@9.9.9");
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{refusal}");
    assert!(
        refusal.contains("the server refused: FAILED_PRECONDITION: no image app@9.9.9"),
        "{refusal}"
    );

    for machine in &mut machines {
        machine.agent.kill();
    }
    server.kill();
}
