//! Flotte's HTTP client against a real HTTPS endpoint (hyper + rustls, a test
//! CA made by rcgen): trust by `ca_file` and refusal without it, chunked
//! bodies, redirects never followed, timeouts, bounded bodies; then the real
//! server delivering webhooks and the real agent running HTTP checks over it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use flotte_proto::http::{request, ClientError, HttpEndpoint, OutgoingRequest};
use flotte_tests::https_endpoint::{TestCa, TestEndpoint, CHUNK, CHUNKS};
use flotte_tests::{test_runtime, wait_until, Agent, Server, TempDir};

const TIMEOUT: Duration = Duration::from_secs(10);

fn get(
    endpoint: &HttpEndpoint,
    max_body_bytes: usize,
) -> Result<flotte_proto::http::HttpResponse, ClientError> {
    test_runtime().block_on(request(
        endpoint,
        OutgoingRequest::get(),
        TIMEOUT,
        max_body_bytes,
    ))
}

#[test]
fn the_client_trusts_its_ca_file_decodes_chunks_follows_no_redirect_and_bounds_time_and_bytes() {
    let root = TempDir::new("flotte-https-client").unwrap();
    let ca = TestCa::new(root.path());
    let server = TestEndpoint::https(&ca);
    let trusted =
        |path: &str| HttpEndpoint::from_settings(&server.url(path), Some(&ca.ca_file)).unwrap();

    let ok = get(&trusted("/ok"), 1024).unwrap();
    assert_eq!((ok.status, ok.body.as_slice()), (200, b"ok\n".as_slice()));

    // The system's store does not know the test CA: refused, and said so.
    let untrusted = HttpEndpoint::from_settings(&server.url("/ok?token=s3cret"), None).unwrap();
    let error = get(&untrusted, 1024).unwrap_err().to_string();
    assert!(
        error.contains(&format!("https://{}/ok?…", server.address)),
        "{error}"
    );
    assert!(error.contains("CA"), "{error}");
    assert!(!error.contains("s3cret"), "{error}");

    let chunked = get(&trusted("/chunked"), 64 * 1024).unwrap();
    assert_eq!(
        String::from_utf8(chunked.body).unwrap(),
        CHUNK.repeat(CHUNKS)
    );
    assert!(!chunked.truncated);

    let asked_for_ok = |server: &TestEndpoint| {
        server
            .received()
            .iter()
            .filter(|request| request.path == "/ok")
            .count()
    };
    let before = asked_for_ok(&server);
    let redirect = get(&trusted("/redirect"), 1024).unwrap();
    assert_eq!(
        (redirect.status, redirect.location.as_deref()),
        (302, Some("/ok"))
    );
    assert!(
        redirect.status_line().contains("not followed"),
        "{}",
        redirect.status_line()
    );
    assert_eq!(asked_for_ok(&server), before, "the redirect was followed");

    let started = Instant::now();
    let never = test_runtime()
        .block_on(request(
            &trusted("/never"),
            OutgoingRequest::get(),
            Duration::from_millis(500),
            1024,
        ))
        .unwrap_err();
    assert!(matches!(never, ClientError::Timeout { .. }), "{never}");
    assert!(
        never.to_string().contains("did not answer within 500ms"),
        "{never}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let large = get(&trusted("/large"), 4096).unwrap();
    assert_eq!(
        (large.status, large.body.len(), large.truncated),
        (200, 4096, true)
    );
}

#[test]
fn webhooks_go_over_https_with_their_ca_file_and_checks_run_over_https() {
    let root = TempDir::new("flotte-https-fleet").unwrap();
    let ca = TestCa::new(root.path());
    let receiver = TestEndpoint::https(&ca);
    let mut server =
        Server::init(root.path(), "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.append_config(&format!(
        "[[webhook]]\nurl = \"{}\"\nca_file = \"{}\"\ntimeout = \"2s\"\n\n[[webhook]]\nurl = \"{}\"\ntimeout = \"2s\"\nmax_attempts = 1\n",
        receiver.url("/hook"),
        ca.ca_file.display(),
        receiver.url("/untrusted"),
    ));
    server.start();
    let token = server.token("role=web", "dc1", &[]);
    let mut agent = Agent::new(root.path(), "web-1", &server.address, &token).with_config(&format!(
        "[[check]]\nname = \"trusted\"\nkind = \"http\"\nurl = \"{}\"\nca_file = \"{}\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\nrise = 1\nfall = 1\n\n\
         [[check]]\nname = \"untrusted\"\nkind = \"http\"\nurl = \"{}\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\nrise = 1\nfall = 1\ncritical = false\n",
        receiver.url("/ok"),
        ca.ca_file.display(),
        receiver.url("/ok"),
    ));
    agent.start();

    // The trusted check passes, the other one fails naming why: degraded.
    let degraded = || {
        server
            .machines()
            .iter()
            .any(|machine| machine["hostname"] == "web-1" && machine["state"] == "degraded")
    };
    assert!(wait_until(TIMEOUT, degraded), "{}", agent.log());
    let shown = || server.ctl_json(&["machines", "show", "web-1"]);
    let machine = shown();
    let checks = machine["checks"].as_array().unwrap();
    let check = |name: &str| {
        checks
            .iter()
            .find(|check| check["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(check("trusted")["healthy"], true, "{machine}");
    assert!(
        check("trusted")["last_output"]
            .as_str()
            .unwrap()
            .starts_with("HTTP 200"),
        "{machine}"
    );
    assert_eq!(check("untrusted")["healthy"], false, "{machine}");
    assert!(
        check("untrusted")["last_output"]
            .as_str()
            .unwrap()
            .contains("not signed by a CA trusted here"),
        "{machine}"
    );

    // Transitions reach the webhook with the CA file, and only it.
    assert!(
        wait_until(TIMEOUT, || !receiver.received_json("/hook").is_empty()),
        "{}",
        server.log()
    );
    let alert = &receiver.received_json("/hook")[0];
    assert_eq!(alert["kind"], "machine_state", "{alert}");
    assert!(receiver
        .received()
        .iter()
        .all(|request| request.path != "/untrusted"));
    let refused = || {
        server
            .log()
            .lines()
            .find(|line| line.contains("webhook unreachable"))
            .map(str::to_owned)
    };
    assert!(
        wait_until(TIMEOUT, || refused().is_some()),
        "{}",
        server.log()
    );
    let refused = refused().unwrap_or_default();
    assert!(
        refused.contains(&format!("TLS with {} failed", receiver.url("/untrusted"))),
        "{refused}"
    );
    assert!(
        refused.contains("not signed by a CA trusted here"),
        "{refused}"
    );
}
