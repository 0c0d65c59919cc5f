//! End-to-end tests of staged rollouts with six real agents in three zones,
//! each running the real sample service: a qualification → canary → waves
//! rollout with an approval gate, a broken release halting at the canary and
//! rolled back by itself, the server killed with SIGKILL in the middle of a
//! wave, and `stop-all`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use flotte_tests::sample_fleet::{
    push_sample_image, set_image_everywhere, start_sample_fleet, trust_new_release_key, Behaviour,
    SampleMachine,
};
use flotte_tests::{sample_value, scrape, wait_until, Server, TempDir, WebhookReceiver};

/// (name, zone, labels): one qualification machine and five in production.
const FLEET: [(&str, &str, &str); 6] = [
    ("qa-1", "dc1", "env=qa"),
    ("web-1", "dc1", "env=prod"),
    ("web-2", "dc2", "env=prod"),
    ("web-3", "dc3", "env=prod"),
    ("web-4", "dc2", "env=prod"),
    ("web-5", "dc3", "env=prod"),
];

struct Fleet {
    root: TempDir,
    keys: PathBuf,
    server: Server,
    machines: Vec<SampleMachine>,
    webhook: WebhookReceiver,
}

impl Fleet {
    /// A server, a trusted key, images v1 (healthy), v2 (healthy) and v3
    /// (breaks 3 s after starting), and the six machines on v1.
    fn start() -> Self {
        let root = TempDir::new("flotte-rollouts").unwrap();
        let mut server = Server::init(root.path(), "server", &[]).with_run_args(&[
            "--report-interval",
            "1s",
            "--metrics-listen",
            "127.0.0.1:0",
        ]);
        let webhook = WebhookReceiver::start();
        server.append_config(&format!(
            "[[webhook]]\nurl = \"{}\"\ntimeout = \"2s\"\n",
            webhook.url
        ));
        server.start();
        let keys = trust_new_release_key(&server, root.path());
        push_sample_image(&server, root.path(), &keys, "1.0.0", Behaviour::Healthy);
        push_sample_image(&server, root.path(), &keys, "2.0.0", Behaviour::Healthy);
        push_sample_image(
            &server,
            root.path(),
            &keys,
            "3.0.0",
            Behaviour::BreaksAfter(3.0),
        );
        let machines = start_sample_fleet(&server, root.path(), &keys, &FLEET);
        set_image_everywhere(&server, &machines, "1.0.0");
        Fleet {
            root,
            keys,
            server,
            machines,
            webhook,
        }
    }

    fn plan(&self, name: &str, text: &str) -> PathBuf {
        let path = self.root.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn create(&self, image: &str, plan: &std::path::Path) -> String {
        let created = self.server.ctl_json(&[
            "rollout",
            "create",
            "--image",
            image,
            "--plan",
            plan.to_str().unwrap(),
        ]);
        created["id"].as_str().unwrap().to_owned()
    }

    fn show(&self, id: &str) -> serde_json::Value {
        self.server.ctl_json(&["rollout", "show", id])
    }

    fn wait_rollout(
        &self,
        id: &str,
        timeout: Duration,
        condition: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let reached = wait_until(timeout, || {
            last = self.show(id);
            condition(&last)
        });
        assert!(
            reached,
            "rollout {id} never got there: {last:#}\n{}",
            self.server.log()
        );
        last
    }

    /// Passes of the server's rollout loop so far (its own metric).
    fn rollout_passes(&self) -> f64 {
        let address = self.server.metrics_address().expect("metrics listener");
        sample_value(&scrape(&address), "flotte_rollout_passes_total", &[])
            .expect("flotte_rollout_passes_total")
    }

    fn machine(&self, hostname: &str) -> &SampleMachine {
        self.machines
            .iter()
            .find(|machine| machine.agent.name == hostname)
            .expect("a machine of the fleet")
    }

    fn current_image(&self, name: &str) -> String {
        self.server.ctl_json(&["machines", "show", name])["current_image"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// Starts `flottectl rollout watch ID`, waits for its first line, sends it
/// SIGINT as a terminal's Ctrl-C would, and checks what it says and that the
/// rollout still waits for its approval.
fn ctrl_c_stops_the_watch_not_the_rollout(fleet: &Fleet, id: &str) {
    use std::io::BufRead;
    let mut watch = std::process::Command::new(flotte_tests::binary("flottectl"))
        .args(["--profile"])
        .arg(fleet.server.admin_profile())
        .args(["--server", &fleet.server.address, "rollout", "watch", id])
        .env_remove("FLOTTE_PROFILE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The pipe stays open until the watch has exited: a closed stdout
    // would end it (quietly, as `| head` should) before the Ctrl-C.
    let mut stdout = std::io::BufReader::new(watch.stdout.take().unwrap());
    let mut first_line = String::new();
    stdout.read_line(&mut first_line).unwrap();
    assert!(first_line.contains("rollout"), "{first_line:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let stopped = watch.wait_with_output().unwrap();
    drop(stdout);
    let said = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(130), "{said}");
    let shown = fleet.server.ctl_json(&["rollout", "show", id]);
    assert!(
        shown["waiting_for"]
            .as_str()
            .unwrap_or("")
            .starts_with("approval of stage qualification"),
        "{shown:#}"
    );
    let state = shown["state"].as_str().unwrap();
    assert!(
        said.contains(&format!("stopped watching; rollout {id} goes on, {state}")),
        "{said}"
    );
}

const STAGED_PLAN: &str = r#"
[[stage]]
name = "qualification"
selector = "env=qa"
bake = "1s"
approval = true

[[stage]]
name = "canary"
selector = "env=prod"
batch = 1
bake = "1s"

[[stage]]
name = "waves"
selector = "env=prod"
batch = 2
max_unavailable_per_zone = 1

[policy]
max_failures = 1
machine_deadline = "90s"
on_failure = "rollback"
"#;

#[test]
fn staged_rollout_succeeds_then_a_broken_release_halts_at_the_canary_and_rolls_back() {
    let fleet = Fleet::start();
    let plan = fleet.plan("staged.toml", STAGED_PLAN);

    // A dry run shows stages and waves with machines and zones, and changes nothing.
    let dry_run = [
        "rollout",
        "create",
        "--image",
        "app@2.0.0",
        "--plan",
        plan.to_str().unwrap(),
        "--dry-run",
    ];
    let dry = fleet.server.ctl_json(&dry_run);
    assert_eq!(dry["waves"], 4, "{dry:#}");
    let waves: Vec<(u64, String, String)> = dry["machine_states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["wave"].as_u64().unwrap(),
                m["hostname"].as_str().unwrap().to_owned(),
                m["zone"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        waves[0],
        (1, "qa-1".to_owned(), "dc1".to_owned()),
        "{waves:?}"
    );
    assert_eq!(
        waves[1],
        (2, "web-1".to_owned(), "dc1".to_owned()),
        "{waves:?}"
    );
    for wave in 3..=4 {
        let zones: Vec<&String> = waves.iter().filter(|w| w.0 == wave).map(|w| &w.2).collect();
        let mut unique = zones.clone();
        unique.dedup();
        assert_eq!(
            zones.len(),
            unique.len(),
            "wave {wave} takes one machine per zone: {waves:?}"
        );
    }
    let table = String::from_utf8_lossy(&fleet.server.ctl(&dry_run).stdout).into_owned();
    assert!(
        table.contains("dry run") && table.contains("web-3") && table.contains("dc3"),
        "{table}"
    );
    assert_eq!(
        fleet
            .server
            .ctl_json(&["rollout", "list"])
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // The real one: qualification first, then it waits for approval.
    let id = fleet.create("app@2.0.0", &plan);
    fleet.wait_rollout(&id, Duration::from_secs(90), |shown| {
        shown["waiting_for"]
            .as_str()
            .unwrap_or("")
            .starts_with("approval of stage qualification")
    });
    assert_eq!(fleet.current_image("qa-1"), "app@2.0.0");
    assert_eq!(
        fleet.current_image("web-1"),
        "app@1.0.0",
        "nothing past the gate"
    );
    // Ctrl-C in `watch` stops the watch, says that the rollout goes on,
    // and leaves it waiting.
    ctrl_c_stops_the_watch_not_the_rollout(&fleet, &id);
    // A second rollout touching the same machines is refused, naming them.
    let overlapping = fleet.server.ctl(&dry_run[..6]);
    assert!(!overlapping.status.success());
    let refusal = String::from_utf8_lossy(&overlapping.stderr);
    assert!(
        refusal.contains("machines already in rollout") && refusal.contains("web-3"),
        "{refusal}"
    );

    fleet.server.ctl_ok(&["rollout", "approve", &id]);
    // `watch` follows it to the end and exits 0 on success.
    let watched = fleet.server.ctl(&["rollout", "watch", &id]);
    let progress = String::from_utf8_lossy(&watched.stdout);
    assert!(
        watched.status.success(),
        "{progress}\n{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    assert!(
        progress.contains("canary") && progress.contains("succeeded"),
        "{progress}"
    );
    let done = fleet.show(&id);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    for machine in done["machine_states"].as_array().unwrap() {
        assert_eq!(machine["state"], "committed", "{machine}");
        assert_eq!(machine["previous_image"], "app@1.0.0");
        assert!(machine["duration_seconds"].as_i64().is_some());
    }
    for machine in &fleet.machines {
        assert_eq!(
            machine.serves().as_deref(),
            Some("v2.0.0"),
            "{}",
            machine.agent.name
        );
        assert_eq!(machine.commits_of("2.0.0"), 1, "{}", machine.agent.log());
    }

    // v3 passes its swap, then fails its health check: the canary turns
    // down during its bake, which reaches max_failures = 1, and the rollout
    // reverts the canary to v2 by itself.
    let broken_plan = fleet.plan(
        "broken.toml",
        "[[stage]]\nname = \"canary\"\nselector = \"env=prod\"\nbatch = 1\nbake = \"8s\"\n\n\
         [[stage]]\nname = \"waves\"\nselector = \"env=prod\"\nbatch = 2\n\n\
         [policy]\nmax_failures = 1\nmachine_deadline = \"90s\"\non_failure = \"rollback\"\n",
    );
    let broken = fleet.create("app@3.0.0", &broken_plan);
    let watched = fleet.server.ctl(&["rollout", "watch", &broken]);
    assert!(
        !watched.status.success(),
        "a rolled back rollout is not a success"
    );
    let shown = fleet.show(&broken);
    assert_eq!(shown["state"], "rolled_back", "{shown:#}");
    let canary = &shown["machine_states"][0];
    assert_eq!(canary["stage"], "canary");
    assert!(
        matches!(canary["state"].as_str(), Some("rolled_back" | "failed")),
        "{canary}"
    );
    let canary_name = canary["hostname"].as_str().unwrap();
    for machine in &fleet.machines {
        let name = machine.agent.name.as_str();
        assert!(
            wait_until(Duration::from_secs(60), || fleet.current_image(name)
                == "app@2.0.0"),
            "{name} is not back on v2: {}",
            machine.agent.log()
        );
        if name != canary_name {
            assert_eq!(machine.commits_of("3.0.0"), 0, "{name} never got v3");
        }
    }
    // Every rollout event went to the webhooks too.
    let actions_seen = |wanted: &str| {
        fleet.webhook.received().iter().any(|event| {
            event["kind"] == "rollout"
                && event["rollout"] == broken.as_str()
                && event["action"] == wanted
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || actions_seen(
            "rollout.rolled_back"
        )),
        "{:#?}",
        fleet.webhook.received()
    );
    assert!(actions_seen("rollout.created") && actions_seen("rollout.machine-failed"));
    // Operators' commands and the controller's decisions are in the audit log.
    let audit = String::from_utf8_lossy(&fleet.server.ctl(&["audit", "list"]).stdout).into_owned();
    for action in [
        "rollout.create",
        "rollout.approve",
        "rollout.rolling_back",
        "rollout.rolled_back",
    ] {
        assert!(
            audit.contains(action),
            "{action} missing from the audit log:\n{audit}"
        );
    }

    // Back to v1 is a downgrade: refused without --force, naming the
    // machine; a dry run says what would need it; with --force the rollout
    // runs and the agent accepts the lower version as wanted.
    let qa_plan = fleet.plan(
        "qa.toml",
        "[[stage]]\nname = \"qa\"\nselector = \"env=qa\"\n\n\
         [policy]\nmax_failures = 1\nmachine_deadline = \"90s\"\non_failure = \"halt\"\n",
    );
    let downgrade = [
        "rollout",
        "create",
        "--image",
        "app@1.0.0",
        "--plan",
        qa_plan.to_str().unwrap(),
    ];
    let refused = fleet.server.ctl(&downgrade);
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && refusal.contains("a downgrade for 1 of 1 machines (qa-1 runs app@2.0.0)")
            && refusal.contains("add --force"),
        "{refusal}"
    );
    let rollouts_before = fleet.server.ctl_json(&["rollout", "list"]);
    let mut dry_run = downgrade.to_vec();
    dry_run.push("--dry-run");
    let dry = fleet.server.ctl(&dry_run);
    let said = String::from_utf8_lossy(&dry.stderr);
    assert!(
        dry.status.success()
            && said.contains("warning: a downgrade")
            && said.contains("(needs --force)"),
        "{said}"
    );
    assert_eq!(fleet.server.ctl_json(&["rollout", "list"]), rollouts_before);
    let mut forced = downgrade.to_vec();
    forced.push("--force");
    let forced_id = fleet.server.ctl_json(&forced)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = fleet.wait_rollout(&forced_id, Duration::from_secs(90), |shown| {
        shown["state"] == "succeeded"
    });
    assert_eq!(done["state"], "succeeded");
    let forced_in_audit = fleet
        .server
        .ctl_json(&["audit", "list"])
        .as_array()
        .unwrap()
        .iter()
        .any(|entry| {
            entry["action"] == "rollout.create"
                && entry["arguments"]["force"] == true
                && entry["result"].as_str().unwrap_or("").contains(&forced_id)
        });
    assert!(forced_in_audit, "the forced creation is audited as such");
    assert_eq!(fleet.current_image("qa-1"), "app@1.0.0");
}

#[test]
fn a_server_killed_mid_wave_resumes_and_swaps_every_machine_once_and_stop_all_pauses() {
    let mut fleet = Fleet::start();
    let plan = fleet.plan(
        "waves.toml",
        "[[stage]]\nname = \"all\"\nbatch = 2\nmax_unavailable_per_zone = 1\nbake = \"2s\"\n\n\
         [policy]\nmax_failures = 1\nmachine_deadline = \"120s\"\non_failure = \"halt\"\n",
    );
    let id = fleet.create("app@2.0.0", &plan);
    // In the middle of the second wave: its machines were sent v2.
    let shown = fleet.wait_rollout(&id, Duration::from_secs(90), |shown| {
        shown["wave"] == 2
            && shown["machine_states"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["wave"] == 2 && m["state"] != "pending")
    });
    let in_flight: Vec<&str> = shown["machine_states"]
        .as_array()
        .unwrap()
        .iter()
        // Past the download: what is left of their swap needs no server. A
        // machine still `sent` or `downloading` needs the server for the
        // image's bytes, so it may or may not finish before the restart.
        .filter(|m| m["wave"] == 2 && (m["state"] == "switching" || m["state"] == "verifying"))
        .map(|m| m["hostname"].as_str().unwrap())
        .collect();
    fleet.server.kill();
    // The agents go on with their swaps while the server is away: the ones
    // that had their image commit it.
    assert!(
        wait_until(Duration::from_secs(60), || in_flight
            .iter()
            .all(|hostname| fleet.machine(hostname).commits_of("2.0.0") == 1)),
        "{in_flight:?} did not commit v2 while the server was away"
    );
    fleet.server.start();
    let watched = fleet.server.ctl(&["rollout", "watch", &id]);
    assert!(
        watched.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&watched.stdout),
        String::from_utf8_lossy(&watched.stderr),
        fleet.server.log()
    );
    for machine in &fleet.machines {
        assert_eq!(
            machine.commits_of("2.0.0"),
            1,
            "{} swapped to v2 once: {}",
            machine.agent.name,
            machine.agent.log()
        );
        assert_eq!(machine.serves().as_deref(), Some("v2.0.0"));
    }
    assert!(fleet.server.log().contains("resuming rollout"));

    // stop-all pauses every running rollout in one call; resume and abort.
    let gated = fleet.plan(
        "gated.toml",
        "[[stage]]\nname = \"first\"\nselector = \"env=qa\"\napproval = true\n\n\
         [[stage]]\nname = \"rest\"\nselector = \"env=prod\"\n",
    );
    push_sample_image(
        &fleet.server,
        fleet.root.path(),
        &fleet.keys,
        "4.0.0",
        Behaviour::Healthy,
    );
    let held = fleet.create("app@4.0.0", &gated);
    fleet.wait_rollout(&held, Duration::from_secs(60), |shown| {
        shown["waiting_for"]
            .as_str()
            .unwrap_or("")
            .starts_with("approval")
    });
    let stopped = fleet.server.ctl_json(&["rollout", "stop-all"]);
    assert_eq!(stopped.as_array().unwrap().len(), 1, "{stopped:#}");
    assert_eq!(stopped[0]["state"], "paused");
    let listed = fleet.server.ctl_json(&["rollout", "list"]);
    let states: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["paused", "succeeded"], "newest first");
    // Paused: approving opens the gate but nothing moves, however many
    // passes the rollout loop makes (waiting for two full ones after the
    // approval answered).
    fleet.server.ctl_ok(&["rollout", "approve", &held]);
    let passes_after_approval = fleet.rollout_passes();
    assert!(
        wait_until(Duration::from_secs(10), || fleet.rollout_passes()
            >= passes_after_approval + 2.0),
        "the rollout loop made no passes: {}",
        fleet.server.log()
    );
    assert_eq!(fleet.show(&held)["state"], "paused");
    assert_eq!(fleet.current_image("web-1"), "app@2.0.0");
    let aborted = fleet.server.ctl_json(&["rollout", "abort", &held]);
    assert_eq!(aborted["state"], "aborted");
    let refused = fleet.server.ctl(&["rollout", "resume", &held]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot resume"));
}
