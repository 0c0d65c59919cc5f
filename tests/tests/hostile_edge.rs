//! End-to-end tests of the bounds that hold before anyone authenticates
//! (issue 14, item 1), against the real server binary on 127.0.0.1:0:
//! anonymous requests with random paths do not grow the metrics, connections
//! without a certificate beyond the cap are closed (and idle ones time out)
//! while an enrolled agent keeps its session, and an `Enroll` flood gets
//! `RESOURCE_EXHAUSTED` while a real enrollment still succeeds after it, and
//! a viewer's image push is refused before the server reads any of it.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotte_proto::transport::{channel, client_config};
use flotte_proto::v1::enrollment_client::EnrollmentClient;
use flotte_proto::v1::images_client::ImagesClient;
use flotte_proto::v1::EnrollRequest;
use flotte_tests::{
    channel_as, sample_value, scrape, test_runtime, wait_until, Agent, Server, TempDir,
};
use tokio::io::AsyncReadExt;

/// A started server with `limits` as its `[limits]` table and `/metrics` on.
fn server_with_limits(root: &TempDir, limits: &str) -> Server {
    let mut server = Server::init(root.path(), "server", &[])
        .with_run_args(&["--metrics-listen", "127.0.0.1:0"]);
    server.append_config(&format!("[limits]\n{limits}"));
    server.start();
    server
}

/// TLS without a client certificate, trusting the server's CA.
fn anonymous_tls(server: &Server) -> Arc<rustls::ClientConfig> {
    Arc::new(client_config(&server.ca_pem(), None).unwrap())
}

#[test]
fn thousands_of_random_anonymous_paths_do_not_grow_the_metrics() {
    let root = TempDir::new("flotte-edge").unwrap();
    let server = server_with_limits(&root, "");
    let requests: u32 = 3000;
    test_runtime().block_on(async {
        let mut grpc =
            tonic::client::Grpc::new(channel(&server.address, anonymous_tls(&server)).unwrap());
        for index in 0..requests {
            grpc.ready().await.unwrap();
            // Distinct, kilobyte-long paths: each would have been a series.
            let path = format!(
                "/flood{index}.Service/{}",
                "x".repeat(1024 + index as usize % 512)
            );
            let status = grpc
                .unary::<(), (), _>(
                    tonic::Request::new(()),
                    path.try_into().unwrap(),
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unimplemented, "{status}");
        }
    });
    let metrics = scrape(&server.metrics_address().unwrap());
    let methods: BTreeSet<&str> = metrics
        .samples
        .iter()
        .filter(|sample| sample.metric.starts_with("flotte_rpc_"))
        .filter_map(|sample| sample.labels.get("method"))
        .collect();
    assert_eq!(methods, BTreeSet::from(["unknown"]), "{methods:?}");
    assert_eq!(
        sample_value(
            &metrics,
            "flotte_rpc_requests_total",
            &[("method", "unknown"), ("code", "12")]
        ),
        Some(f64::from(requests)),
        "every request is still counted, as unknown/UNIMPLEMENTED"
    );
}

/// What happened to one anonymous connection.
#[derive(Debug)]
struct AnonymousConnectionFate {
    /// Application bytes received (the server's HTTP/2 settings): the
    /// connection was served.
    bytes_received: usize,
    /// How long after its handshake it was closed by the server.
    closed_after: Duration,
}

/// Opens a TLS connection without a client certificate, sends nothing, and
/// reads until the server closes it.
async fn hold_anonymous_connection(
    address: String,
    tls: Arc<rustls::ClientConfig>,
) -> AnonymousConnectionFate {
    let tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .unwrap();
    let connected = Instant::now();
    let mut bytes_received = 0;
    let mut buffer = [0u8; 1024];
    let read_until_closed = async {
        while let Ok(read @ 1..) = stream.read(&mut buffer).await {
            bytes_received += read;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_until_closed)
        .await
        .expect("the server never closed an anonymous connection");
    AnonymousConnectionFate {
        bytes_received,
        closed_after: connected.elapsed(),
    }
}

#[test]
fn anonymous_connections_beyond_the_cap_are_closed_while_an_agent_keeps_its_session() {
    let root = TempDir::new("flotte-edge").unwrap();
    let cap = 20;
    let idle = Duration::from_secs(2);
    let server = server_with_limits(
        &root,
        &format!(
            "max_anonymous_connections = {cap}\nanonymous_idle_timeout = \"{}s\"\nmax_unauthenticated_connections_per_source = 1000\n",
            idle.as_secs()
        ),
    );
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token);
    agent.start_and_wait_for_session(&server);

    let attempts = 2 * cap;
    let fates = test_runtime().block_on(async {
        let tls = anonymous_tls(&server);
        let connections: Vec<_> = (0..attempts)
            .map(|_| {
                tokio::spawn(hold_anonymous_connection(
                    server.address.clone(),
                    Arc::clone(&tls),
                ))
            })
            .collect();
        let mut fates = Vec::new();
        for connection in connections {
            fates.push(connection.await.unwrap());
        }
        fates
    });
    let (served, refused): (Vec<_>, Vec<_>) =
        fates.iter().partition(|fate| fate.bytes_received > 0);
    assert_eq!(served.len(), cap, "{fates:?}");
    assert_eq!(refused.len(), attempts - cap, "{fates:?}");
    // The served ones were closed by their idle timeout, not by the cap.
    assert!(
        served.iter().all(|fate| fate.closed_after >= idle / 2),
        "{served:?}"
    );

    // The agent was never disturbed: one session, still up.
    assert_eq!(server.connected_count(), 1);
    assert_eq!(
        server.log().matches("agent session opened").count(),
        1,
        "{}",
        server.log()
    );
    agent.kill();
}

/// A join token in the right format that names no token on this server.
fn unknown_token(server: &Server) -> String {
    let fingerprint = server
        .token("role=web", "dc1", &[])
        .rsplit('.')
        .next()
        .unwrap()
        .to_owned();
    format!(
        "flotte1.{}.{}.{fingerprint}",
        "0".repeat(16),
        "0".repeat(32)
    )
}

#[test]
fn an_enroll_flood_is_refused_with_resource_exhausted_and_a_real_enrollment_follows() {
    let root = TempDir::new("flotte-edge").unwrap();
    let server = server_with_limits(
        &root,
        "enroll_per_second_per_source = 5\nenroll_burst_per_source = 10\n",
    );
    let bad_token = unknown_token(&server);
    let flood = 200;
    let (exhausted, other) = test_runtime().block_on(async {
        let mut client =
            EnrollmentClient::new(channel(&server.address, anonymous_tls(&server)).unwrap());
        let enroll_with_hostname = |hostname: String| EnrollRequest {
            join_token: bad_token.clone(),
            csr_pem: String::new(),
            hostname,
        };
        // A message over the enrollment limit (64 KiB) is refused unread.
        let status = client
            .enroll(enroll_with_hostname("x".repeat(70_000)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
        // A hostname outside the grammar is refused, naming the problem and
        // quoting only its beginning.
        let status = client
            .enroll(enroll_with_hostname(format!("web_1{}", "x".repeat(1000))))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        assert!(
            status.message().contains("hostname \"web_1xxx") && status.message().len() < 200,
            "{status}"
        );

        let mut exhausted = Vec::new();
        let mut other = Vec::new();
        for _ in 0..flood {
            let status = client
                .enroll(enroll_with_hostname("flood".into()))
                .await
                .unwrap_err();
            if status.code() == tonic::Code::ResourceExhausted {
                exhausted.push(status);
            } else {
                other.push(status);
            }
        }
        (exhausted, other)
    });
    // The burst of 10 (one spent on the hostname above) plus what refills
    // at 5/s during the flood gets through to the token check; the rest not.
    assert!(exhausted.len() >= flood - 40, "{other:?}");
    assert!(
        exhausted[0]
            .message()
            .contains("too many enrollment requests from 127.0.0.1"),
        "{}",
        exhausted[0]
    );
    assert!(
        other
            .iter()
            .all(|status| status.code() != tonic::Code::ResourceExhausted),
        "{other:?}"
    );

    // A real enrollment after the burst: the agent gives up when refused,
    // so each refused attempt is followed by a new agent until the bucket
    // of 127.0.0.1 has refilled.
    let token = server.token("role=web", "dc1", &[]);
    let started = Instant::now();
    let mut attempt = 0;
    let mut agent = loop {
        attempt += 1;
        let mut agent = Agent::new(
            root.path(),
            &format!("web-{attempt}"),
            &server.address,
            &token,
        );
        agent.start();
        let settled = wait_until(Duration::from_secs(20), || {
            agent.is_enrolled() || !agent.is_running()
        });
        assert!(settled, "{}", agent.log());
        if agent.is_enrolled() {
            break agent;
        }
        assert!(
            agent.log().contains("too many enrollment requests"),
            "refused for another reason: {}",
            agent.log()
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no enrollment got through after the flood"
        );
    };
    assert!(
        wait_until(Duration::from_secs(20), || server.connected_count() == 1),
        "{}",
        agent.log()
    );
    agent.kill();
}

#[test]
fn an_image_push_by_a_viewer_is_refused_before_the_server_reads_it() {
    let root = TempDir::new("flotte-edge").unwrap();
    let server = server_with_limits(&root, "");
    let viewer = server.create_operator(root.path(), "vera", "viewer");
    let status = test_runtime().block_on(async {
        let mut images = ImagesClient::new(channel_as(&viewer, &server.address));
        // A push whose first message never comes: a server that reads
        // before checking the role would wait on it forever.
        let never_sends = tokio_stream::pending();
        tokio::time::timeout(Duration::from_secs(10), images.push_image(never_sends))
            .await
            .expect("the refusal must not wait for the first message")
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(status.message().contains("viewer"), "{status}");
}

#[test]
fn a_hello_with_a_hostname_outside_the_grammar_opens_no_session() {
    let root = TempDir::new("flotte-edge").unwrap();
    let server = server_with_limits(&root, "");
    let token = server.token("role=web", "dc1", &[]);
    let mut enrolled = Agent::new(root.path(), "web-1", &server.address, &token);
    enrolled.start_and_wait_for_session(&server);
    enrolled.kill();
    assert!(wait_until(Duration::from_secs(10), || server
        .connected_count()
        == 0));
    // The same identity, now reporting a hostname with an underscore.
    let mut renamed = Agent::new(root.path(), "web_1", &server.address, "");
    let identity = renamed.data_dir.join("identity");
    std::fs::create_dir_all(&identity).unwrap();
    for entry in std::fs::read_dir(enrolled.data_dir.join("identity")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), identity.join(entry.file_name())).unwrap();
    }
    renamed.start();
    assert!(
        wait_until(Duration::from_secs(20), || renamed
            .log()
            .contains("hostname \"web_1\" contains '_'")),
        "{}",
        renamed.log()
    );
    assert_eq!(server.connected_count(), 0);
    renamed.kill();
}
