//! End-to-end tests of the foundation: enrollment, the mTLS session, refusals
//! with their causes, restarts and certificate renewal — all with the real
//! binaries on 127.0.0.1:0 and certificates from the server's own CA.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use flotte_proto::transport::{channel, client_config};
use flotte_proto::v1::machines_client::MachinesClient;
use flotte_proto::v1::ListMachinesRequest;
use flotte_tests::{wait_until, Agent, Server, TempDir};

const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

fn machine_by_hostname(server: &Server, hostname: &str) -> Option<serde_json::Value> {
    server
        .machines()
        .into_iter()
        .find(|machine| machine["hostname"] == hostname)
}

fn wait_connected(server: &Server, count: usize) -> bool {
    wait_until(ENROLL_TIMEOUT, || server.connected_count() == count)
}

#[test]
fn three_agents_enroll_and_are_listed_with_labels_and_zones() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let fleet = [
        ("web-1", "env=prod,role=web", "dc1"),
        ("web-2", "env=prod,role=web", "dc2"),
        ("db-1", "env=prod,role=db", "dc3"),
    ];
    let mut agents: Vec<Agent> = fleet
        .iter()
        .map(|(name, labels, zone)| {
            let token = server.token(labels, zone, &[]);
            Agent::new(root.path(), name, &server.address, &token)
        })
        .collect();
    agents.iter_mut().for_each(Agent::start);
    assert!(wait_connected(&server, 3), "server log:\n{}", server.log());

    let machines = server.machines();
    assert_eq!(machines.len(), 3);
    for (name, labels, zone) in fleet {
        let machine = machine_by_hostname(&server, name).unwrap();
        assert_eq!(machine["zone"], zone);
        assert_eq!(machine["connected"], true);
        let expected = flotte_proto::labels::parse_labels(labels).unwrap();
        for (key, value) in expected {
            assert_eq!(machine["labels"][&key], value.as_str(), "{name}");
        }
        for field in ["id", "last_seen", "agent_version", "certificate_expires_at"] {
            assert!(!machine[field].is_null(), "{field} missing for {name}");
        }
        assert!(machine["kernel"]
            .as_str()
            .is_some_and(|kernel| !kernel.is_empty()));
    }
    // Selector and show agree with the listing.
    let web = server.ctl_json(&["machines", "list", "--selector", "role=web"]);
    assert_eq!(web.as_array().unwrap().len(), 2);
    let db_id = machine_by_hostname(&server, "db-1").unwrap()["id"].clone();
    let shown = server.ctl_json(&["machines", "show", db_id.as_str().unwrap()]);
    assert_eq!(shown["hostname"], "db-1");
    assert_eq!(shown["labels"]["role"], "db");
}

#[test]
fn refused_tokens_name_their_cause_and_write_no_identity() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let mut other = Server::init(root.path(), "other-server", &[]);
    other.start();

    // Reused single-use token.
    let token = server.token("role=web", "dc1", &[]);
    let mut first = Agent::new(root.path(), "first", &server.address, &token);
    first.start();
    assert!(wait_connected(&server, 1), "{}", first.log());
    let mut reused = Agent::new(root.path(), "reused", &server.address, &token);
    reused.start();

    // Expired token.
    let expired_token = server.token("role=web", "dc1", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let mut expired = Agent::new(root.path(), "expired", &server.address, &expired_token);
    expired.start();

    // A token from another server: the CA fingerprint cannot match.
    let foreign_token = other.token("role=web", "dc1", &[]);
    let mut foreign = Agent::new(root.path(), "foreign", &server.address, &foreign_token);
    foreign.start();

    // A revoked token.
    let revoked_token = server.token("role=web", "dc1", &[]);
    let revoked_id = revoked_token.split('.').nth(1).unwrap();
    assert!(server
        .ctl(&["token", "revoke", revoked_id])
        .status
        .success());
    let mut revoked = Agent::new(root.path(), "revoked", &server.address, &revoked_token);
    revoked.start();

    let cases = [
        (&mut reused, "has already been used (1 of 1 uses)"),
        (&mut expired, "expired at 20"), // RFC 3339, never Unix seconds
        (&mut foreign, "is not the one the join token was made for"),
        (&mut revoked, "was revoked"),
    ];
    for (agent, cause) in cases {
        let status = agent.wait_exit(Duration::from_secs(20));
        assert!(
            status.is_some_and(|status| !status.success()),
            "{} should exit non-zero: {}",
            agent.name,
            agent.log()
        );
        assert!(
            agent.log().contains(cause),
            "{}: expected {cause:?} in:\n{}",
            agent.name,
            agent.log()
        );
        assert!(!agent.is_enrolled(), "{} wrote an identity", agent.name);
        assert!(
            !agent.data_dir.join("identity").join("key.pem").exists(),
            "{} kept a key",
            agent.name
        );
    }
    assert_eq!(
        server.machines().len(),
        1,
        "no refused agent became a machine"
    );
}

fn list_machines_with(
    ca_pem: &str,
    client: Option<(&str, &str)>,
    address: &str,
) -> Result<usize, tonic::Status> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tls = client_config(ca_pem, client).unwrap();
        let mut machines = MachinesClient::new(channel(address, Arc::new(tls)).unwrap());
        machines
            .list_machines(ListMachinesRequest::default())
            .await
            .map(|response| response.into_inner().machines.len())
    })
}

#[test]
fn wrong_identities_are_refused_with_their_cause() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let mut other = Server::init(root.path(), "other-server", &[]);
    other.start();
    let ca_pem = server.ca_pem();

    // Admin call without a client certificate.
    let status = list_machines_with(&ca_pem, None, &server.address).unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("needs a client certificate"),
        "{status:?}"
    );

    // An agent's certificate used on an admin RPC.
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start();
    assert!(wait_connected(&server, 1), "{}", agent.log());
    let identity = flotte_agent::identity::MachineIdentity::load(&agent.data_dir)
        .unwrap()
        .unwrap();
    let status = list_machines_with(
        &ca_pem,
        Some((&identity.certificate_pem, &identity.key_pem)),
        &server.address,
    )
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("is not an operator"),
        "{status:?}"
    );

    // An operator certificate from a foreign CA, trusting the right server.
    let foreign_profile = flotte_common::profile::Profile::load(&other.admin_profile()).unwrap();
    // The same through flottectl: a profile mixing our CA with a foreign certificate.
    let mixed = root.path().join("mixed-profile");
    flotte_common::profile::Profile {
        ca_pem: ca_pem.clone(),
        ..foreign_profile
    }
    .write(&mixed)
    .unwrap();
    let output = flotte_tests::flottectl(&mixed, &server.address, &["machines", "list"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not issued by the server's CA"), "{stderr}");

    // An agent whose client certificate comes from a foreign CA: enrolled with
    // the other server, then pointed at ours while trusting our CA.
    let other_token = other.token("role=web", "dc1", &[]);
    let mut stray = Agent::new(root.path(), "stray", &other.address, &other_token);
    stray.start();
    assert!(
        wait_until(ENROLL_TIMEOUT, || stray.is_enrolled()),
        "{}",
        stray.log()
    );
    stray.kill();
    std::fs::write(stray.data_dir.join("identity").join("ca.pem"), &ca_pem).unwrap();
    let mut stray_here = Agent::new(root.path(), "stray", &server.address, "");
    stray_here.start();
    assert!(
        wait_until(Duration::from_secs(20), || stray_here.log().contains(
            "the server refused our client certificate: it was not issued by the server's CA"
        )),
        "{}",
        stray_here.log()
    );
    assert_eq!(server.machines().len(), 1);

    // A server certificate from another CA: our enrolled agent pointed at the other server.
    agent.kill();
    let mut misdirected = Agent::new(root.path(), "web-1", &other.address, "");
    misdirected.start();
    assert!(
        wait_until(Duration::from_secs(20), || misdirected.log().contains(
            "the server's certificate was not issued by the CA we trust"
        )),
        "{}",
        misdirected.log()
    );
}

#[test]
fn restarts_keep_identities_and_agents_reconnect_by_themselves() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let mut agents: Vec<Agent> = ["a-1", "a-2"]
        .iter()
        .map(|name| {
            let token = server.token("role=web", "dc1", &[]);
            Agent::new(root.path(), name, &server.address, &token)
        })
        .collect();
    agents.iter_mut().for_each(Agent::start);
    assert!(wait_connected(&server, 2), "{}", server.log());
    let id_before = machine_by_hostname(&server, "a-1").unwrap()["id"].clone();

    // Agent killed and restarted: same id, no second enrollment.
    agents[0].kill();
    assert!(wait_connected(&server, 1));
    agents[0].start();
    assert!(wait_connected(&server, 2), "{}", agents[0].log());
    assert_eq!(server.machines().len(), 2);
    assert_eq!(
        machine_by_hostname(&server, "a-1").unwrap()["id"],
        id_before
    );
    assert_eq!(
        agents[0]
            .log()
            .matches("INFO flotte_agent: enrolled")
            .count(),
        1,
        "{}",
        agents[0].log()
    );
    assert!(agents[0].log().contains("already enrolled"));

    // Server killed and restarted on the same address: agents come back alone.
    server.kill();
    std::thread::sleep(Duration::from_millis(500));
    server.start();
    assert!(
        wait_connected(&server, 2),
        "agents did not reconnect:\n{}",
        agents[1].log()
    );
    assert_eq!(server.machines().len(), 2);
}

fn certificate_expiry(server: &Server, hostname: &str) -> Option<String> {
    machine_by_hostname(server, hostname)?["certificate_expires_at"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn short_lived_certificates_renew_without_dropping_the_session() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[])
        .with_run_args(&["--machine-certificate-ttl", "3s"]);
    server.start();
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start();
    assert!(wait_connected(&server, 1), "{}", agent.log());

    // Several lifetimes: the certificate must be renewed again and again.
    let mut expiries = std::collections::BTreeSet::new();
    wait_until(Duration::from_secs(20), || {
        if let Some(expiry) = certificate_expiry(&server, "web-1") {
            expiries.insert(expiry);
        }
        expiries.len() >= 4 && agent.log().matches("certificate renewed").count() >= 3
    });
    assert!(
        expiries.len() >= 4,
        "renewals seen: {expiries:?}\n{}",
        agent.log()
    );
    assert!(
        agent.log().matches("certificate renewed").count() >= 3,
        "{}",
        agent.log()
    );
    assert_eq!(server.connected_count(), 1);
    assert_eq!(
        agent.log().matches("session established").count(),
        1,
        "the session must survive renewals:\n{}",
        agent.log()
    );
    // The renewed certificate on disk is what a restart uses: it still works.
    agent.kill();
    agent.start();
    assert!(wait_connected(&server, 1), "{}", agent.log());
}

#[test]
fn an_agent_whose_certificate_expired_while_the_server_was_away_recovers() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[])
        .with_run_args(&["--machine-certificate-ttl", "2s"]);
    server.start();
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start();
    assert!(wait_connected(&server, 1), "{}", agent.log());
    let id = machine_by_hostname(&server, "web-1").unwrap()["id"].clone();

    server.kill();
    // Longer than the certificate lifetime: it expires while nobody can renew it.
    std::thread::sleep(Duration::from_secs(4));
    server.start();
    assert!(
        wait_connected(&server, 1),
        "agent did not recover:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("re-enrolled"), "{}", agent.log());
    assert_eq!(server.machines().len(), 1);
    assert_eq!(machine_by_hostname(&server, "web-1").unwrap()["id"], id);
}

#[test]
fn relabelling_pushes_the_desired_state_and_the_agent_acknowledges_it() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let token = server.token("env=prod,role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start();
    assert!(wait_connected(&server, 1), "{}", agent.log());
    assert!(wait_until(ENROLL_TIMEOUT, || {
        machine_by_hostname(&server, "web-1")
            .is_some_and(|machine| machine["applied_desired_version"] == 1)
    }));

    let relabelled = server.ctl_json(&[
        "machines",
        "label",
        "web-1",
        "--set",
        "role=db,tier=gold",
        "--remove",
        "env",
    ]);
    assert_eq!(relabelled["desired_version"], 2);
    assert_eq!(
        relabelled["labels"],
        serde_json::json!({"role": "db", "tier": "gold"})
    );
    // The agent applies the pushed state on the live session and acks it.
    assert!(
        wait_until(Duration::from_secs(10), || {
            machine_by_hostname(&server, "web-1")
                .is_some_and(|machine| machine["applied_desired_version"] == 2)
        }),
        "{}",
        agent.log()
    );
    let applied: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(agent.data_dir.join("applied-state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(applied["version"], 2);
    assert_eq!(applied["labels"]["tier"], "gold");
    assert_eq!(agent.log().matches("session established").count(), 1);

    let refused = server.ctl(&["machines", "label", "web-1", "--set", "bad key=x"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("bad key"));
}

#[test]
fn reflection_serves_identified_callers_and_health_is_open() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();
    let profile = flotte_common::profile::Profile::load(&server.admin_profile()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let list_services = |client: Option<(&str, &str)>| {
            let tls = client_config(&profile.ca_pem, client).unwrap();
            let channel = channel(&server.address, Arc::new(tls)).unwrap();
            async move {
                let request = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                };
                let mut responses = ServerReflectionClient::new(channel)
                    .server_reflection_info(tokio_stream::iter([request]))
                    .await?
                    .into_inner();
                let mut names = Vec::new();
                while let Some(response) = responses.message().await? {
                    if let Some(MessageResponse::ListServicesResponse(list)) =
                        response.message_response
                    {
                        names.extend(list.service.into_iter().map(|service| service.name));
                    }
                }
                Ok::<_, tonic::Status>(names)
            }
        };
        let names = list_services(Some((&profile.certificate_pem, &profile.key_pem)))
            .await
            .unwrap();
        for expected in [
            "flotte.v1.Machines",
            "flotte.v1.Tokens",
            "flotte.v1.AgentSession",
            "flotte.v1.Enrollment",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|name| name == expected),
                "{expected} missing from {names:?}"
            );
        }
        let anonymous = list_services(None).await.unwrap_err();
        assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);

        let tls = client_config(&profile.ca_pem, None).unwrap();
        let health = HealthClient::new(channel(&server.address, Arc::new(tls)).unwrap())
            .check(HealthCheckRequest {
                service: "flotte.v1.Machines".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(health.status, 1, "SERVING");
    });
}
