//! Partitions, for real: agents (and replicas) in network namespaces on a
//! bridge, cut apart with nftables rules inside their namespaces (packets
//! dropped in silence, as in a real partition), slowed by a delaying
//! forwarder, then healed. See `flotte_tests::netns`.
//!
//! These tests need root, iproute2 and nftables; they fail without them
//! unless `FLOTTE_TEST_SKIP_NETNS=1` asks to skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flotte_tests::netns::{DelayingForwarder, Host, Lab};
use flotte_tests::sample_fleet::{
    prepare_sample_machine, push_sample_image, set_image_everywhere, trust_new_release_key,
    Behaviour, SampleMachine,
};
use flotte_tests::{
    binary, ensure_login, flottectl, test_runtime, wait_until, Agent, Server, TempDir,
    WebhookReceiver,
};

#[allow(dead_code)]
#[path = "../../server/src/store/postgres/cluster.rs"]
mod cluster;

/// Generous: several agents and servers on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// How often the test's agents report (the server tells them).
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// A silent machine is `unreachable` 3 s after its last report.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(3);

/// After healing, every agent must be back within this (issue 17).
const BACK_WITHIN: Duration = Duration::from_secs(30);

/// A server in the test's namespace, listening on the lab's operator
/// address, reporting every second, with `settings` appended.
fn server_on_lab(root: &Path, lab: &Lab, settings: &str) -> Server {
    let listen = format!("{}:0", lab.operator_address());
    let san = lab.operator_address().to_string();
    let mut server = Server::init(root, "server", &["--listen", &listen, "--san", &san])
        .with_run_args(&[
            "--report-interval",
            &format!("{}s", REPORT_INTERVAL.as_secs()),
        ]);
    server.append_config(settings);
    server.start();
    server
}

/// An agent on `host`, enrolled at `server_address`, with `config`.
fn agent_on(
    root: &Path,
    host: &Host,
    server: &Server,
    server_address: &str,
    labels: &str,
    config: &str,
) -> Agent {
    let zone = format!("dc{}", host.zone);
    let token = server.token(labels, &zone, &[]);
    let mut agent =
        Agent::new(root, &host.name, server_address, &token).in_namespace(&host.namespace);
    if !config.is_empty() {
        agent = agent.with_config(config);
    }
    agent.start();
    agent
}

/// Hostname → state, as the server lists them.
fn states(server: &Server) -> Vec<(String, String)> {
    server
        .machines()
        .iter()
        .map(|machine| {
            (
                machine["hostname"].as_str().unwrap_or_default().to_owned(),
                machine["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn all_in_state(server: &Server, hostnames: &[&str], state: &str) -> bool {
    let states = states(server);
    hostnames.iter().all(|hostname| {
        states
            .iter()
            .any(|(listed, listed_state)| listed == hostname && listed_state == state)
    })
}

/// The `(from, to)` transitions of `hostname` after the first `skip`, oldest first.
fn transitions(server: &Server, hostname: &str) -> Vec<(String, String)> {
    let mut history: Vec<(String, String)> = server.ctl_json(&["machines", "show", hostname])
        ["transitions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|transition| {
            (
                transition["from"].as_str().unwrap_or_default().to_owned(),
                transition["to"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    history.reverse();
    history
}

/// The server's log lines about states, sessions and remediation.
fn health_log(server: &Server) -> String {
    server
        .log()
        .lines()
        .filter(|line| {
            ["state changed", "breaker", "remediation", "session"]
                .iter()
                .any(|word| line.contains(word))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The managed key file of `login` on machine `hostname` holds alice's key.
fn holds_alice(managed: &Path, hostname: &str, login: &str) -> bool {
    std::fs::read_to_string(managed.join(hostname).join(login))
        .is_ok_and(|text| text.contains("flotte:user=alice"))
}

fn access_config(managed: &Path, hostname: &str, extra: &str) -> String {
    format!(
        "[access]\nauthorized_keys_dir = \"{}\"\n{extra}",
        managed.join(hostname).display()
    )
}

/// A directory owned by root and closed to others, as the agent demands of
/// a key directory's parents.
fn key_root(root: &Path) -> PathBuf {
    let directory = root.join("keys");
    std::fs::create_dir_all(&directory).unwrap();
    std::fs::set_permissions(
        &directory,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    directory
}

#[test]
fn a_zone_cut_off_goes_unreachable_holds_the_breaker_keeps_or_closes_access_and_comes_back_without_a_storm(
) {
    let Some(mut lab) = Lab::start() else { return };
    let root = TempDir::new("flotte-partition").unwrap();
    let login = "flottepart";
    ensure_login(login);
    let webhook = WebhookReceiver::start();
    let provider_calls = root.path().join("provider-calls");
    let server = server_on_lab(
        root.path(),
        &lab,
        &format!(
            "[[webhook]]\nurl = \"{}\"\ntimeout = \"2s\"\n\n\
             [remediation]\ninterval = \"500ms\"\n\n\
             [[remediation.rule]]\nselector = \"\"\nafter = \"2s\"\nprovider = \"cloud\"\n\n\
             [[remediation.provider]]\nname = \"cloud\"\nkind = \"command\"\ncommand = \"/bin/sh\"\n\
             args = [\"-c\", \"echo called >> {}; exit 1\"]\ntimeout = \"10s\"\n",
            webhook.url,
            provider_calls.display()
        ),
    );
    let managed = key_root(root.path());
    // dc1: three machines that stay reachable; dc2: two that are cut off,
    // one failing closed after 4 s without the server, one keeping access.
    let staying = ["web-1", "web-2", "web-3"];
    let cut = ["web-4", "web-5"];
    let zones = [(1, &staying[..]), (2, &cut[..])];
    let hosts: Vec<Host> = zones
        .iter()
        .flat_map(|(zone, names)| names.iter().map(move |name| (*zone, *name)))
        .map(|(zone, name)| lab.add_host(name, zone))
        .collect();
    let _agents: Vec<Agent> = hosts
        .iter()
        .map(|host| {
            let extra = if host.name == "web-4" {
                "on_disconnect = \"fail-closed\"\nfail_closed_after = \"4s\"\n"
            } else {
                ""
            };
            agent_on(
                root.path(),
                host,
                &server,
                &server.address,
                "role=web",
                &access_config(&managed, &host.name, extra),
            )
        })
        .collect();
    let everyone: Vec<&str> = staying.iter().chain(cut.iter()).copied().collect();
    assert!(
        wait_until(PATIENCE, || all_in_state(&server, &everyone, "operational")),
        "the fleet did not come up: {:?}\n{}",
        states(&server),
        server.log()
    );
    server.grant_new_user_on_web(root.path(), "alice", login, &[]);
    assert!(
        wait_until(PATIENCE, || everyone
            .iter()
            .all(|hostname| holds_alice(&managed, hostname, login))),
        "the grant did not reach every machine"
    );
    let transitions_before: Vec<usize> = everyone
        .iter()
        .map(|hostname| transitions(&server, hostname).len())
        .collect();

    // dc2 is cut off from everything: its machines go silent.
    let cut_at = Instant::now();
    lab.cut_zone(2);
    assert!(
        wait_until(PATIENCE, || all_in_state(&server, &cut, "unreachable")),
        "the cut-off zone did not become unreachable: {:?}",
        states(&server)
    );
    let unreachable_after = cut_at.elapsed();
    assert!(
        lab.dropped_packets(&hosts[3]) > 0,
        "the cut dropped nothing: the fault was not in the way"
    );
    eprintln!(
        "measured: zone cut off → its machines unreachable after {unreachable_after:?} (unreachable_after = {UNREACHABLE_AFTER:?})"
    );
    // The grace counts from a machine's last report, which reached the
    // server up to one report interval (and a late timer's tick) before the
    // cut: CI once saw 2.91 s after the cut, a legitimate 3 s of silence.
    let late_tick = Duration::from_millis(250);
    assert!(
        unreachable_after + REPORT_INTERVAL + late_tick >= UNREACHABLE_AFTER,
        "unreachable before the grace: {unreachable_after:?} after the cut, \
         reports every {REPORT_INTERVAL:?}"
    );

    // The breaker holds: the whole of dc2 is unhealthy, so nothing is
    // replaced, however long the rule's 2 s threshold has passed.
    let mut status = serde_json::Value::Null;
    assert!(
        wait_until(PATIENCE, || {
            status = server.ctl_json(&["status"]);
            status["remediation"]["breaker_open"] == true
        }),
        "the breaker did not open: {status:#}"
    );
    assert!(
        status["remediation"]["breaker_reasons"]
            .to_string()
            .contains("zone dc2: 2 of 2 machines unhealthy"),
        "{status:#}"
    );

    // Access while cut off: web-4 fails closed after 4 s, web-5 keeps it.
    assert!(
        wait_until(PATIENCE, || !holds_alice(&managed, "web-4", login)),
        "the fail-closed machine kept access while cut off"
    );
    let closed_after = cut_at.elapsed();
    eprintln!("measured: cut off → fail-closed machine removed its keys after {closed_after:?} (fail_closed_after = 4s)");
    assert!(
        closed_after >= Duration::from_secs(4),
        "closed too early: {closed_after:?}"
    );
    assert!(
        holds_alice(&managed, "web-5", login),
        "the keep-open machine lost access while cut off"
    );
    // The server gives up the cut-off sessions (unanswered pings); many
    // remediation rounds past the rule's threshold, the breaker still holds.
    assert!(
        wait_until(PATIENCE, || server
            .log()
            .matches("agent session ended")
            .count()
            >= 2),
        "the server kept the cut-off sessions:\n{}",
        server.log()
    );
    let sessions_ended = Instant::now();
    assert!(wait_until(PATIENCE, || sessions_ended.elapsed()
        > Duration::from_secs(3)
        && server.ctl_json(&["status"])["remediation"]["breaker_open"]
            == true));
    assert_eq!(
        server.ctl_json(&["remediation", "list"]),
        serde_json::json!([]),
        "remediation during the partition; the server's account:\n{}",
        health_log(&server)
    );
    assert!(
        !provider_calls.exists(),
        "the provider was called during the partition"
    );
    assert!(
        all_in_state(&server, &staying, "operational"),
        "the reachable zone suffered: {:?}",
        states(&server)
    );

    // Healed: every agent is back within 30 s, access comes back.
    lab.heal(2);
    let healed_at = Instant::now();
    assert!(
        wait_until(BACK_WITHIN, || all_in_state(
            &server,
            &everyone,
            "operational"
        )),
        "not every agent is back within {BACK_WITHIN:?} of healing: {:?}",
        states(&server)
    );
    eprintln!(
        "measured: healed → every agent operational after {:?}",
        healed_at.elapsed()
    );
    assert!(
        wait_until(PATIENCE, || holds_alice(&managed, "web-4", login)),
        "the fail-closed machine did not get its keys back after healing"
    );

    // No storm and no duplicate: each cut machine went unreachable once and
    // came back once; the others did not move; the webhook agrees.
    for (index, hostname) in everyone.iter().enumerate() {
        let after: Vec<(String, String)> =
            transitions(&server, hostname).split_off(transitions_before[index]);
        let expected: Vec<(String, String)> = if cut.contains(hostname) {
            vec![
                ("operational".into(), "unreachable".into()),
                ("unreachable".into(), "operational".into()),
            ]
        } else {
            Vec::new()
        };
        assert_eq!(
            after, expected,
            "transitions of {hostname} during the partition"
        );
    }
    let unreachable_events: Vec<String> = webhook
        .received()
        .iter()
        .filter(|event| event["to"] == "unreachable")
        .map(|event| event["hostname"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut sorted = unreachable_events.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["web-4", "web-5"],
        "webhook events: {unreachable_events:?}"
    );
    assert!(
        wait_until(PATIENCE, || server.ctl_json(&["status"])["remediation"]
            ["breaker_open"]
            == false),
        "the breaker did not close after healing"
    );
    assert_eq!(
        server.ctl_json(&["remediation", "list"]),
        serde_json::json!([]),
        "remediation during the partition; the server's account:\n{}",
        health_log(&server)
    );
}

/// Waits until `condition`, returning how long after `started` it held;
/// panics with `what` if it never does.
fn time_since(started: Instant, what: &str, condition: impl FnMut() -> bool) -> Duration {
    assert!(
        wait_until(PATIENCE, condition),
        "{what}: not within {PATIENCE:?}"
    );
    started.elapsed()
}

#[test]
fn revocations_arrive_through_packet_loss_and_latency_and_after_a_one_way_partition_heals() {
    let Some(mut lab) = Lab::start() else { return };
    let root = TempDir::new("flotte-degraded").unwrap();
    let login = "flottedeg";
    ensure_login(login);
    let server = server_on_lab(root.path(), &lab, "");
    let managed = key_root(root.path());
    // web-oneway hears nothing from the server once cut (what it sends
    // still arrives); web-lossy loses 30 % of its packets each way;
    // web-slow reaches the server through 200 ms of added latency each way.
    let oneway = lab.add_host("web-oneway", 1);
    let lossy = lab.add_host("web-lossy", 2);
    let slow = lab.add_host("web-slow", 3);
    let upstream: std::net::SocketAddr = server.address.parse().unwrap();
    let forwarder = DelayingForwarder::start(
        std::net::SocketAddr::new(lab.operator_address().into(), 0),
        upstream,
        Duration::from_millis(200),
    );
    let slow_address = forwarder.address.to_string();
    let hostnames = ["web-oneway", "web-lossy", "web-slow"];
    let _agents: Vec<Agent> = [
        (&oneway, &server.address),
        (&lossy, &server.address),
        (&slow, &slow_address),
    ]
    .into_iter()
    .map(|(host, address)| {
        agent_on(
            root.path(),
            host,
            &server,
            address,
            "role=web",
            &access_config(&managed, &host.name, ""),
        )
    })
    .collect();
    assert!(
        wait_until(PATIENCE, || all_in_state(
            &server,
            &hostnames,
            "operational"
        )),
        "the fleet did not come up: {:?}\n{}",
        states(&server),
        server.log()
    );
    server.grant_new_user_on_web(root.path(), "alice", login, &[]);
    assert!(
        wait_until(PATIENCE, || hostnames
            .iter()
            .all(|hostname| holds_alice(&managed, hostname, login))),
        "the grant did not reach every machine"
    );

    lab.drop_from(1, lab.operator_address());
    lab.lose_packets(2, 30);
    assert!(
        wait_until(PATIENCE, || all_in_state(
            &server,
            &["web-oneway"],
            "unreachable"
        )),
        "the one-way partition went unnoticed: {:?}",
        states(&server)
    );
    // The lossy and slow sessions carry on (or come back) meanwhile.
    assert!(
        wait_until(PATIENCE, || all_in_state(
            &server,
            &["web-lossy", "web-slow"],
            "operational"
        )),
        "{:?}",
        states(&server)
    );

    // Timed from before the call: the figures include flottectl's own time.
    let revoked_at = Instant::now();
    server.ctl_json(&["user", "revoke", "alice"]);
    let lossy_took = time_since(revoked_at, "revocation through 30 % loss", || {
        !holds_alice(&managed, "web-lossy", login)
    });
    let slow_took = time_since(revoked_at, "revocation through 200 ms latency", || {
        !holds_alice(&managed, "web-slow", login)
    });
    assert!(
        holds_alice(&managed, "web-oneway", login),
        "the one-way cut-off machine cannot have heard of the revocation (keep-open)"
    );
    assert!(lab.dropped_packets(&oneway) > 0 && lab.dropped_packets(&lossy) > 0);
    lab.heal(1);
    let oneway_took = time_since(
        Instant::now(),
        "revocation after the one-way partition heals",
        || !holds_alice(&managed, "web-oneway", login),
    );
    eprintln!(
        "measured: user revoke → keys gone: 30 % loss {lossy_took:?}, 200 ms latency each way {slow_took:?}, one-way partition {oneway_took:?} after healing"
    );
    // Generous bounds for a loaded 2-core machine; the goal (≤ 1 s) is for
    // a healthy network, and these figures go to docs/disaster-recovery.md.
    assert!(lossy_took < Duration::from_secs(15), "{lossy_took:?}");
    assert!(slow_took < Duration::from_secs(5), "{slow_took:?}");
    assert!(
        wait_until(BACK_WITHIN, || all_in_state(
            &server,
            &hostnames,
            "operational"
        )),
        "not every session recovered: {:?}",
        states(&server)
    );
    let mut status = serde_json::Value::Null;
    assert!(
        wait_until(PATIENCE, || {
            status = server.ctl_json(&["access", "status"]);
            status["applied"].as_u64() == Some(3)
        }),
        "not every machine acknowledged the revocation: {status:#}"
    );
}

/// The time at the head of the first line of `log` that contains `needle`
/// (the servers log RFC 3339 times, all from this machine's one clock).
fn logged_at(log: &str, needle: &str) -> Option<String> {
    log.lines()
        .find(|line| line.contains(needle))
        .and_then(|line| line.split_whitespace().next())
        .map(str::to_owned)
}

/// `flottectl … -o json` as the admin (`admin`) through `server`.
fn ctl_json_via(admin: &Path, server: &Server, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let output = flottectl(admin, &server.address, &all);
    assert!(
        output.status.success(),
        "flottectl {args:?} through {}: {}",
        server.address,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `flottectl status` through `server`: the replica leading, if exactly one
/// live replica leads.
fn leader_seen_by(admin: &Path, server: &Server) -> Option<String> {
    let output = flottectl(admin, &server.address, &["status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let leaders: Vec<String> = status["replicas"]
        .as_array()?
        .iter()
        .filter(|replica| replica["leader"] == true && replica["live"] == true)
        .filter_map(|replica| replica["name"].as_str().map(str::to_owned))
        .collect();
    match leaders.as_slice() {
        [leader] => Some(leader.clone()),
        _ => None,
    }
}

#[test]
fn the_leaders_zone_cut_off_from_postgres_and_the_others_gives_up_the_lead_and_no_rollout_step_happens_twice(
) {
    let Some(mut lab) = Lab::start() else { return };
    let operator = lab.operator_address().to_string();
    let lab_network = format!("{}/16", lab.zone_network(0).trim_end_matches("/24"));
    let Some(database) = cluster::private_cluster_on(&operator, &lab_network) else {
        return;
    };
    let url = test_runtime().block_on(database.fresh_database_url_at(&operator));
    let root = TempDir::new("flotte-replica-partition").unwrap();
    // Replica a in zone 1, b in zone 2, c in zone 3; a sample machine in
    // each zone, and a fourth in zone 1.
    let replica_hosts: Vec<Host> = ["replica-a", "replica-b", "replica-c"]
        .iter()
        .zip(1u8..)
        .map(|(name, zone)| lab.add_host(name, zone))
        .collect();
    let names = ["a", "b", "c"];
    let listen = |host: &Host| format!("{}:0", host.address);
    let first_listen = listen(&replica_hosts[0]);
    let first_san = replica_hosts[0].address.to_string();
    let mut replicas = vec![Server::init(
        root.path(),
        "a",
        &[
            "--store-url",
            &url,
            "--name",
            "a",
            "--zone",
            "z1",
            "--listen",
            &first_listen,
            "--san",
            &first_san,
        ],
    )
    .with_run_args(&["--report-interval", "1s"])
    .in_namespace(&replica_hosts[0].namespace)];
    for (index, name) in names.iter().enumerate().skip(1) {
        let data_dir = root.path().join(name);
        let zone = format!("z{}", index + 1);
        let output = Command::new(binary("flotte-server"))
            .args(["replica", "init", "--from"])
            .arg(&replicas[0].data_dir)
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "--name",
                name,
                "--listen",
                &listen(&replica_hosts[index]),
                "--zone",
                &zone,
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "replica init {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        replicas.push(
            Server::existing(data_dir, "", &["--report-interval", "1s"])
                .in_namespace(&replica_hosts[index].namespace),
        );
    }
    for replica in &mut replicas {
        replica.start();
    }
    let admin = replicas[0].admin_profile();
    let keys = trust_new_release_key(&replicas[0], root.path());
    for version in ["1.0.0", "2.0.0"] {
        push_sample_image(
            &replicas[0],
            root.path(),
            &keys,
            version,
            Behaviour::Healthy,
        );
    }
    let addresses: Vec<String> = replicas
        .iter()
        .map(|replica| replica.address.clone())
        .collect();
    let machines: Vec<SampleMachine> = [("web-1", 1u8), ("web-2", 2), ("web-3", 3), ("web-4", 1)]
        .iter()
        .map(|(name, zone)| {
            let host = lab.add_host(name, *zone);
            // Each agent knows every replica (and starts at a random one).
            let others: Vec<&str> = addresses[1..].iter().map(String::as_str).collect();
            let mut machine = prepare_sample_machine(
                &replicas[0],
                &others,
                root.path(),
                &keys,
                name,
                &format!("dc{zone}"),
                "env=prod",
            );
            machine.agent.namespace = Some(host.namespace.clone());
            machine.agent.start();
            machine
        })
        .collect();
    set_image_everywhere(&replicas[0], &machines, "1.0.0");

    // A rollout of one machine per wave.
    let plan = root.path().join("one-by-one.toml");
    std::fs::write(
        &plan,
        "[[stage]]\nname = \"all\"\nbatch = 1\nbake = \"2s\"\n\n\
         [policy]\nmax_failures = 1\nmachine_deadline = \"300s\"\non_failure = \"halt\"\n",
    )
    .unwrap();
    let created = ctl_json_via(
        &admin,
        &replicas[1],
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
    assert!(
        wait_until(PATIENCE, || ctl_json_via(
            &admin,
            &replicas[2],
            &["rollout", "show", &id]
        )["wave"]
            .as_u64()
            >= Some(2)),
        "the rollout did not reach its second wave"
    );

    // The leader's zone is cut off from PostgreSQL and the other replicas
    // (and its agents with it): another replica leads within 10 s, and the
    // cut-off one had given the lead up before that.
    let leader = leader_seen_by(&admin, &replicas[0]).expect("one leader");
    let leader_index = names.iter().position(|name| *name == leader).unwrap();
    let survivor = &replicas[(leader_index + 1) % 3];
    let cut_at = Instant::now();
    lab.cut_zone(replica_hosts[leader_index].zone);
    assert!(
        wait_until(Duration::from_secs(10), || leader_seen_by(&admin, survivor)
            .is_some_and(|new_leader| new_leader != leader)),
        "no other replica leads within 10 s of cutting {leader}'s zone off"
    );
    let new_leader = leader_seen_by(&admin, survivor).unwrap();
    eprintln!(
        "measured: leader {leader}'s zone cut off → {new_leader} leads after {:?}",
        cut_at.elapsed()
    );
    let new_leader_log = replicas[names.iter().position(|name| *name == new_leader).unwrap()].log();
    let old_leader_log = replicas[leader_index].log();
    let gave_up = logged_at(&old_leader_log, "this replica does not lead any more")
        .unwrap_or_else(|| panic!("the cut-off leader never gave the lead up:\n{old_leader_log}"));
    let took_over = logged_at(&new_leader_log, "this replica leads now").unwrap();
    assert!(
        gave_up < took_over,
        "two leaders at once: {leader} gave up at {gave_up}, {new_leader} led from {took_over}"
    );

    // Healed: whatever the cut-off replica still tried to write for its
    // rollout passes was refused by the fence, not stored.
    lab.heal(replica_hosts[leader_index].zone);
    let refused_passes: Vec<String> = replicas[leader_index]
        .log()
        .lines()
        .filter(|line| line.contains("cannot store a rollout pass"))
        .filter(|line| {
            line.split_whitespace()
                .next()
                .is_some_and(|at| at > gave_up.as_str())
        })
        .map(str::to_owned)
        .collect();
    assert!(
        refused_passes.iter().all(|line| line.contains("no longer leads")),
        "a pass of the cut-off replica failed for another reason than its fence: {refused_passes:?}"
    );
    // The rollout completes, the cut-off agents are back, and
    // every machine swapped to v2 exactly once.
    let watched = flottectl(&admin, &addresses.join(","), &["rollout", "watch", &id]);
    assert!(
        watched.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&watched.stdout),
        String::from_utf8_lossy(&watched.stderr)
    );
    assert!(
        wait_until(BACK_WITHIN, || ctl_json_via(
            &admin,
            survivor,
            &["machines", "list"]
        )
        .as_array()
        .is_some_and(|listed| listed
            .iter()
            .all(|machine| machine["connected"] == true))),
        "the cut-off agents did not come back: {}",
        ctl_json_via(&admin, survivor, &["machines", "list"])
    );
    for machine in &machines {
        assert_eq!(
            machine.commits_of("2.0.0"),
            1,
            "{} swapped to v2 exactly once: {}",
            machine.agent.name,
            machine.agent.log()
        );
    }
}
