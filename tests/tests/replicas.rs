//! End to end with several replicas: three real `flotte-server` processes
//! (`a`, `b`, `c`, in zones z1–z3) sharing one PostgreSQL database in a
//! throwaway cluster these tests start themselves, and real agents each
//! held by one of them. A change made through one replica reaches agents
//! held by another; a revoked operator is refused by every replica and its
//! open stream elsewhere is cut; every replica answers the same; and when
//! the leader or a replica holding sessions is killed with SIGKILL, the
//! others take over.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The store's own test harness, shared rather than copied; this test uses
// only part of it.
#[allow(dead_code)]
#[path = "../../server/src/store/postgres/cluster.rs"]
mod cluster;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flotte_proto::v1::machines_client::MachinesClient;
use flotte_proto::v1::WatchMachinesRequest;
use flotte_tests::sample_fleet::{
    push_sample_image, set_image_everywhere, start_sample_machine_with_servers,
    trust_new_release_key, Behaviour, SampleMachine,
};
use flotte_tests::{
    binary, channel_as, ensure_login, flottectl, test_runtime, upload_forensics_as_machine,
    wait_for_forensic_bundle, wait_until, Agent, Server, TempDir,
};

/// Generous: three servers and their agents on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// The replicas' names, in start order.
const REPLICA_NAMES: [&str; 3] = ["a", "b", "c"];

/// Three replicas over one fresh database, started.
struct ReplicaSet {
    root: TempDir,
    replicas: Vec<Server>,
}

impl ReplicaSet {
    /// `None` when PostgreSQL is missing and the environment asks to skip.
    fn start() -> Option<Self> {
        let url = test_runtime().block_on(cluster::fresh_database_url())?;
        Some(Self::start_on(&url, 3))
    }

    /// `count` replicas (a, b, c…) over the database at `url`.
    fn start_on(url: &str, count: usize) -> Self {
        let root = TempDir::new("flotte-replicas").unwrap();
        let first = Server::init(
            root.path(),
            "a",
            &["--store-url", url, "--name", "a", "--zone", "z1"],
        );
        let mut replicas = vec![first];
        for (name, zone) in [("b", "z2"), ("c", "z3")].into_iter().take(count - 1) {
            let data_dir = root.path().join(name);
            let output = Command::new(binary("flotte-server"))
                .args(["replica", "init", "--from"])
                .arg(&replicas[0].data_dir)
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--name", name, "--listen", "127.0.0.1:0", "--zone", zone])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "replica init {name}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                !data_dir.join("admin").exists(),
                "a replica never gets the admin profile"
            );
            replicas.push(Server::existing(data_dir, "", &[]));
        }
        for replica in &mut replicas {
            replica.start();
        }
        ReplicaSet { root, replicas }
    }

    fn admin(&self) -> std::path::PathBuf {
        self.replicas[0].admin_profile()
    }

    /// `flottectl … -o json` as the admin through replica `index`.
    fn ctl_json(&self, index: usize, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let output = flottectl(&self.admin(), &self.replicas[index].address, &all);
        assert!(
            output.status.success(),
            "flottectl {args:?} through replica {index}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// `status` through replica `index`: the replicas it lists.
    fn replicas_seen_by(&self, index: usize) -> Vec<serde_json::Value> {
        self.ctl_json(index, &["status"])["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// One agent per replica (`web-a` held by a, `web-b` by b…), each
    /// knowing only its replica and managing SSH keys under the returned
    /// directory (`<dir>/<hostname>/<login>`).
    fn one_agent_per_replica(&self) -> (Vec<Agent>, std::path::PathBuf) {
        let count = self.replicas.len().to_string();
        let token = self.replicas[0].token("role=web", "dc1", &["--uses", &count]);
        let managed = self.root.path().join("managed");
        let agents = REPLICA_NAMES
            .iter()
            .zip(&self.replicas)
            .map(|(replica, server)| {
                let hostname = format!("web-{replica}");
                agent_on(
                    self.root.path(),
                    &hostname,
                    &server.address,
                    &token,
                    &managed.join(&hostname),
                )
            })
            .collect();
        (agents, managed)
    }

    /// What [`ReplicaSet::holders_seen_by`] lists once every agent of
    /// [`ReplicaSet::one_agent_per_replica`] is connected.
    fn expected_holders(&self) -> Vec<(String, String)> {
        REPLICA_NAMES
            .iter()
            .take(self.replicas.len())
            .map(|replica| (format!("web-{replica}"), (*replica).to_owned()))
            .collect()
    }

    /// The index of the replica named `name`.
    fn index_of(&self, name: &str) -> usize {
        REPLICA_NAMES
            .iter()
            .position(|known| *known == name)
            .unwrap()
    }

    /// The live replicas' names and the leader's, as replica `index` sees them.
    fn leader_seen_by(&self, index: usize) -> Option<String> {
        let replicas = self.replicas_seen_by(index);
        let leaders: Vec<&serde_json::Value> = replicas
            .iter()
            .filter(|replica| replica["leader"] == true && replica["live"] == true)
            .collect();
        match leaders.as_slice() {
            [leader] => leader["name"].as_str().map(str::to_owned),
            _ => None,
        }
    }

    /// Hostname → replica holding its session, as replica `index` lists them.
    fn holders_seen_by(&self, index: usize) -> Vec<(String, String)> {
        let mut holders: Vec<(String, String)> = self
            .ctl_json(index, &["machines", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|machine| machine["connected"] == true)
            .map(|machine| {
                (
                    machine["hostname"].as_str().unwrap_or_default().to_owned(),
                    machine["replica"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        holders.sort();
        holders
    }

    fn log(&self) -> String {
        self.replicas
            .iter()
            .map(|replica| format!("--- {}\n{}", replica.data_dir.display(), replica.log()))
            .collect()
    }
}

/// An agent `name` (role=web) that knows only the replica at `address`,
/// managing SSH keys in `managed`.
fn agent_on(root: &Path, name: &str, address: &str, token: &str, managed: &Path) -> Agent {
    let mut agent = Agent::new(root, name, address, token).with_config(&format!(
        "[access]\nauthorized_keys_dir = \"{}\"\n",
        managed.display()
    ));
    agent.start();
    agent
}

#[test]
fn changes_made_through_one_replica_reach_agents_and_streams_held_by_the_others() {
    let Some(mut set) = ReplicaSet::start() else {
        return;
    };
    // Every replica sees the three, exactly one of them leading.
    assert!(
        wait_until(PATIENCE, || (0..3).all(|index| {
            set.replicas_seen_by(index).len() == 3 && set.leader_seen_by(index).is_some()
        })),
        "replicas: {:#?}\n{}",
        set.replicas_seen_by(2),
        set.log()
    );
    let zones: Vec<String> = set
        .replicas_seen_by(1)
        .iter()
        .map(|replica| {
            format!(
                "{}@{}",
                replica["name"].as_str().unwrap(),
                replica["zone"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(zones, ["a@z1", "b@z2", "c@z3"]);

    // One agent held by each replica.
    let (agents, managed) = set.one_agent_per_replica();
    let expected_holders = set.expected_holders();
    assert!(
        wait_until(PATIENCE, || (0..3)
            .all(|index| set.holders_seen_by(index) == expected_holders)),
        "sessions as b lists them: {:?}\n{}",
        set.holders_seen_by(1),
        set.log()
    );

    // c counts every machine by its state, even those it never held and
    // that enrolled through another replica after it started.
    let mut counted = serde_json::Value::Null;
    assert!(
        wait_until(PATIENCE, || {
            counted = set.ctl_json(2, &["status"])["fleet"].clone();
            counted["machines"] == 3 && counted["states"]["operational"] == 3
        }),
        "status through c: {counted:#}"
    );

    // A relabel through a reaches web-c's agent, held by c.
    set.ctl_json(0, &["machines", "label", "web-c", "--set", "tier=gold"]);
    let mut shown = serde_json::Value::Null;
    assert!(
        wait_until(PATIENCE, || {
            shown = set.ctl_json(2, &["machines", "show", "web-c"]);
            shown["labels"]["tier"] == "gold"
                && shown["desired_version"].as_u64() >= Some(2)
                && shown["applied_desired_version"] == shown["desired_version"]
        }),
        "web-c did not apply the relabel made through a: {shown:#}\n{}",
        agents[2].log()
    );

    // A quarantine through a reaches web-c's agent too.
    set.ctl_json(
        0,
        &["machines", "quarantine", "web-c", "--reason", "disk errors"],
    );
    assert!(
        wait_until(PATIENCE, || agents[2].log().contains("machine quarantined")),
        "web-c was not told of its quarantine:\n{}",
        agents[2].log()
    );
    // Its forensic bundle, uploaded to c (the only replica web-c knows), is
    // downloaded whole through a and through b.
    let bundle_through = |index: usize| {
        wait_for_forensic_bundle(
            &set.admin(),
            &set.replicas[index].address,
            "web-c",
            &set.root.path().join(format!("forensics-{index}")),
            PATIENCE,
        )
    };
    let through_a = bundle_through(0);
    let through_b = bundle_through(1);
    assert!(
        agents[2].log().contains("forensic bundle uploaded"),
        "{}",
        agents[2].log()
    );
    assert_eq!(
        through_a["sha256"].as_str().map(str::len),
        Some(64),
        "{through_a:#}"
    );
    assert!(through_a["size"].as_u64() > Some(0), "{through_a:#}");
    for field in ["quarantine_id", "sha256", "size", "files"] {
        assert_eq!(
            through_a[field], through_b[field],
            "{field}: {through_a:#} / {through_b:#}"
        );
    }
    // A second upload for that quarantine, through b (a compromised machine
    // trying another replica), is refused: the first bundle stands everywhere.
    let quarantine_id = through_a["quarantine_id"].as_str().unwrap();
    let forged = upload_forensics_as_machine(
        &agents[2].data_dir,
        &set.replicas[1].address,
        quarantine_id,
        b"forged evidence",
    )
    .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::AlreadyExists, "{forged:?}");
    let listed_by_c = set.ctl_json(2, &["machines", "forensics", "web-c", "--list"]);
    assert_eq!(
        listed_by_c.as_array().map(Vec::len),
        Some(1),
        "{listed_by_c:#}"
    );
    assert_eq!(listed_by_c[0]["size"], through_a["size"]);

    // A user granted and then revoked through a: the keys appear and go on
    // the machines held by b and c. (sshd reading these files is shown by
    // the access tests.)
    let login = "flotte-replica";
    ensure_login(login);
    let key_directory = set.root.path().join("keys");
    std::fs::create_dir_all(&key_directory).unwrap();
    let key = key_directory.join("alice");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(keygen.success());
    let public_key = key.with_extension("pub");
    set.ctl_json(
        0,
        &[
            "user",
            "add",
            "alice",
            "--ssh-key",
            public_key.to_str().unwrap(),
        ],
    );
    set.ctl_json(
        0,
        &[
            "access",
            "grant",
            "alice",
            "--selector",
            "role=web",
            "--login",
            login,
        ],
    );
    let key_file = |host: &str| managed.join(host).join(login);
    let holds_alice = |host: &str| {
        std::fs::read_to_string(key_file(host)).is_ok_and(|text| text.contains("flotte:user=alice"))
    };
    assert!(
        wait_until(PATIENCE, || holds_alice("web-b") && holds_alice("web-c")),
        "the grant made through a did not reach b's and c's machines\n{}",
        set.log()
    );
    let revoked_at = Instant::now();
    set.ctl_json(0, &["user", "revoke", "alice"]);
    assert!(
        wait_until(PATIENCE, || !holds_alice("web-b") && !holds_alice("web-c")),
        "the revocation made through a did not reach b's and c's machines"
    );
    eprintln!(
        "measured: user revoke through a → keys gone on machines held by b and c after {:?}",
        revoked_at.elapsed()
    );
    // Their acknowledgements are visible from c.
    let mut status = serde_json::Value::Null;
    assert!(
        wait_until(PATIENCE, || {
            status = set.ctl_json(2, &["access", "status"]);
            status["applied"].as_u64() == Some(3)
        }),
        "c does not see every machine's acknowledgement: {status:#}"
    );

    // An operator revoked through b: its open watch on c is cut at once,
    // and a and c refuse it.
    let ops = set.replicas[0].create_operator(set.root.path(), "ops", "viewer");
    let runtime = test_runtime();
    let (ended_sender, ended) = tokio::sync::oneshot::channel();
    let c_address = set.replicas[2].address.clone();
    runtime.block_on(async {
        let mut events = MachinesClient::new(channel_as(&ops, &c_address))
            .watch(WatchMachinesRequest::default())
            .await
            .unwrap()
            .into_inner();
        // The current states arrive first: the stream is open.
        assert!(events.message().await.unwrap().is_some());
        tokio::spawn(async move {
            let outcome = loop {
                match events.message().await {
                    Ok(Some(_)) => continue,
                    other => break format!("{other:?}"),
                }
            };
            let _ = ended_sender.send((Instant::now(), outcome));
        });
    });
    set.ctl_json(1, &["operator", "revoke", "ops"]);
    let revoked_at = Instant::now();
    let (ended_at, outcome) = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), ended).await })
        .expect("ops's watch stream on c was not cut within 5 s")
        .unwrap();
    let cut_after = ended_at.saturating_duration_since(revoked_at);
    eprintln!(
        "measured: operator revoke through b → watch on c cut after {cut_after:?} ({outcome})"
    );
    assert!(
        cut_after < Duration::from_secs(2),
        "cut after {cut_after:?}"
    );
    for index in [0, 2] {
        let refused = flottectl(&ops, &set.replicas[index].address, &["machines", "list"]);
        assert!(
            !refused.status.success(),
            "replica {index} still serves ops"
        );
    }

    // A machine decommissioned through a: its session on b is cut.
    set.ctl_json(0, &["machines", "decommission", "web-b"]);
    assert!(
        wait_until(PATIENCE, || agents[1]
            .log()
            .contains("stopping: this machine was decommissioned")),
        "web-b's session on b was not refused:\n{}",
        agents[1].log()
    );
    let mut listed = serde_json::Value::Null;
    assert!(
        wait_until(PATIENCE, || {
            listed = set.ctl_json(2, &["machines", "show", "web-b"]);
            listed["retired_at"].is_string() && listed["connected"] == false
        }),
        "c does not show web-b retired and gone: {listed:#}"
    );

    // The leader is killed: another one leads within 10 s.
    let leader = set.leader_seen_by(0).unwrap();
    let leader_index = set.index_of(&leader);
    let survivor = (leader_index + 1) % 3;
    set.replicas[leader_index].kill();
    let killed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || set
            .leader_seen_by(survivor)
            .is_some_and(|new_leader| new_leader != leader)),
        "no new leader within 10 s of killing {leader}: {:#?}",
        set.replicas_seen_by(survivor)
    );
    eprintln!(
        "measured: leader {leader} killed → {} leads after {:?}",
        set.leader_seen_by(survivor).unwrap_or_default(),
        killed_at.elapsed()
    );
    drop(agents);
}

#[test]
fn a_rollout_outlives_its_killed_leader_and_agents_outlive_their_killed_replica() {
    let Some(mut set) = ReplicaSet::start() else {
        return;
    };
    let root = set.root.path().to_path_buf();
    let keys = trust_new_release_key(&set.replicas[0], &root);
    // Pushed through a, stored in PostgreSQL: every replica serves them.
    for version in ["1.0.0", "2.0.0"] {
        push_sample_image(&set.replicas[0], &root, &keys, version, Behaviour::Healthy);
    }
    let other_addresses: Vec<String> = set.replicas[1..]
        .iter()
        .map(|replica| replica.address.clone())
        .collect();
    let others: Vec<&str> = other_addresses.iter().map(String::as_str).collect();
    let machines: Vec<SampleMachine> = [
        ("web-1", "dc1"),
        ("web-2", "dc2"),
        ("web-3", "dc1"),
        ("web-4", "dc2"),
    ]
    .iter()
    .map(|(name, zone)| {
        start_sample_machine_with_servers(
            &set.replicas[0],
            &others,
            &root,
            &keys,
            name,
            zone,
            "env=prod",
        )
    })
    .collect();
    assert!(
        wait_until(PATIENCE, || set.holders_seen_by(0).len() == machines.len()),
        "agents did not connect: {:?}\n{}",
        set.holders_seen_by(0),
        set.log()
    );
    // Set and watched through a, whichever replica holds each agent.
    set_image_everywhere(&set.replicas[0], &machines, "1.0.0");

    // A rollout of one machine per wave, created through b.
    let plan = root.join("one-by-one.toml");
    std::fs::write(
        &plan,
        "[[stage]]\nname = \"all\"\nbatch = 1\nbake = \"2s\"\n\n\
         [policy]\nmax_failures = 1\nmachine_deadline = \"120s\"\non_failure = \"halt\"\n",
    )
    .unwrap();
    let created = set.ctl_json(
        1,
        &[
            "rollout",
            "create",
            "--image",
            "app@2.0.0",
            "--plan",
            plan.to_str().unwrap(),
        ],
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let mut shown = serde_json::Value::Null;
    assert!(
        wait_until(PATIENCE, || {
            shown = set.ctl_json(2, &["rollout", "show", &id]);
            shown["wave"].as_u64() >= Some(2)
        }),
        "the rollout did not reach its second wave: {shown:#}\n{}",
        set.log()
    );

    // Its leader is killed mid-rollout.
    let leader = set.leader_seen_by(2).unwrap();
    let leader_index = set.index_of(&leader);
    set.replicas[leader_index].kill();
    let killed_at = Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|index| *index != leader_index).collect();
    assert!(
        wait_until(Duration::from_secs(10), || set
            .leader_seen_by(survivors[0])
            .is_some_and(|new_leader| new_leader != leader)),
        "no new leader within 10 s of killing {leader}"
    );
    eprintln!(
        "measured: leader {leader} killed mid-rollout → {} leads after {:?}",
        set.leader_seen_by(survivors[0]).unwrap_or_default(),
        killed_at.elapsed()
    );
    // flottectl given every address moves past the dead one.
    let every_address = set
        .replicas
        .iter()
        .map(|replica| replica.address.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let watched = flottectl(&set.admin(), &every_address, &["rollout", "watch", &id]);
    assert!(
        watched.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&watched.stdout),
        String::from_utf8_lossy(&watched.stderr),
        set.log()
    );
    for machine in &machines {
        assert_eq!(
            machine.commits_of("2.0.0"),
            1,
            "{} swapped to v2 exactly once: {}",
            machine.agent.name,
            machine.agent.log()
        );
        assert_eq!(machine.serves().as_deref(), Some("v2.0.0"));
    }
    // One truth from every replica: each survivor shows the same machine
    // rows, all committed (a replica that does not lead re-reads only the
    // rows each pass names).
    let shown_by: Vec<serde_json::Value> = survivors
        .iter()
        .map(|&index| set.ctl_json(index, &["rollout", "show", &id])["machine_states"].clone())
        .collect();
    let states: Vec<&str> = shown_by[0]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|row| row["state"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        states,
        vec!["committed"; machines.len()],
        "{:#}",
        shown_by[0]
    );
    assert_eq!(
        shown_by[0], shown_by[1],
        "the survivors show different machine rows"
    );

    // A verification asked through a replica that does not hold the
    // machine reaches it and its answer is read back there.
    let holders = set.holders_seen_by(survivors[0]);
    let (hostname, holder) = holders.first().cloned().unwrap();
    let asking = survivors
        .iter()
        .copied()
        .find(|index| REPLICA_NAMES[*index] != holder)
        .unwrap();
    let verified = flottectl(
        &set.admin(),
        &set.replicas[asking].address,
        &["machines", "verify", &hostname, "-o", "json"],
    );
    assert!(
        verified.status.success(),
        "verify {hostname} (held by {holder}) through {}: {}{}",
        REPLICA_NAMES[asking],
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );

    // Now a replica holding sessions is killed: its agents move to the
    // last one within 15 s, and no machine changes state on the way.
    let holders = set.holders_seen_by(survivors[1]);
    let victim = survivors
        .iter()
        .copied()
        .max_by_key(|index| {
            let name = REPLICA_NAMES[*index];
            holders.iter().filter(|(_, holder)| holder == name).count()
        })
        .unwrap();
    let last = survivors
        .iter()
        .copied()
        .find(|index| *index != victim)
        .unwrap();
    let last_name = REPLICA_NAMES[last];
    let moved = holders
        .iter()
        .filter(|(_, holder)| holder != last_name)
        .count();
    assert!(
        moved > 0,
        "the replica to kill holds no session: {holders:?}"
    );
    let states_before: Vec<serde_json::Value> = set
        .ctl_json(last, &["machines", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|machine| machine["state_since"].clone())
        .collect();
    set.replicas[victim].kill();
    let killed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let now = set.holders_seen_by(last);
            now.len() == machines.len() && now.iter().all(|(_, holder)| holder == last_name)
        }),
        "the agents of the killed replica are not all back within 15 s: {:?}",
        set.holders_seen_by(last)
    );
    eprintln!(
        "measured: replica killed with {moved} sessions → all back on {last_name} after {:?}",
        killed_at.elapsed()
    );
    let listed = set.ctl_json(last, &["machines", "list"]);
    let states_after: Vec<serde_json::Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|machine| machine["state_since"].clone())
        .collect();
    assert_eq!(
        states_before, states_after,
        "a machine changed state: {listed:#}"
    );
}

#[test]
fn a_postgres_restart_loses_no_change_and_the_replicas_resynchronise() {
    let Some(database) = cluster::private_cluster() else {
        return;
    };
    let url = test_runtime().block_on(database.fresh_database_url());
    let set = ReplicaSet::start_on(&url, 2);
    let (_agents, _) = set.one_agent_per_replica();
    let expected = set.expected_holders();
    assert!(
        wait_until(PATIENCE, || set.holders_seen_by(1) == expected),
        "sessions: {:?}\n{}",
        set.holders_seen_by(1),
        set.log()
    );
    // web-b, held by b, applied what was asked through a.
    let applied_through_b = |tier: &str| {
        let shown = set.ctl_json(1, &["machines", "show", "web-b"]);
        shown["labels"]["tier"] == tier
            && shown["applied_desired_version"] == shown["desired_version"]
    };
    set.ctl_json(0, &["machines", "label", "web-b", "--set", "tier=before"]);
    assert!(wait_until(PATIENCE, || applied_through_b("before")));

    database.restart();
    let restarted_at = Instant::now();
    // The first calls after the restart may meet a connection the restart
    // cut; the change is made as soon as a replica can write it.
    let relabelled = wait_until(PATIENCE, || {
        flottectl(
            &set.admin(),
            &set.replicas[0].address,
            &["machines", "label", "web-b", "--set", "tier=after"],
        )
        .status
        .success()
    });
    assert!(
        relabelled,
        "no replica could write after the restart\n{}",
        set.log()
    );
    assert!(
        wait_until(PATIENCE, || applied_through_b("after")),
        "the change made after the restart did not reach web-b through b\n{}",
        set.log()
    );
    eprintln!(
        "measured: PostgreSQL restarted → a change through a applied by b's agent after {:?}",
        restarted_at.elapsed()
    );
    assert!(
        set.replicas
            .iter()
            .all(|replica| replica.log().contains("change feed reconnected")),
        "every replica's feed reconnected and resynchronised\n{}",
        set.log()
    );
    // Nothing made before is lost: both machines, their sessions, the label.
    assert!(wait_until(PATIENCE, || set.holders_seen_by(0) == expected));
}
