//! End-to-end tests of operators' certificates over time: flottectl renews
//! its own certificate (same key) once a third of its lifetime is left and
//! on demand, warns when it expires soon, a revoked operator cannot renew,
//! and `flotte-server admin-profile` mints a working admin profile from the
//! CA key when the admin's is lost — with the real binaries.

// Helpers shared by tests panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use flotte_tests::{binary, flottectl, wait_until, Server, TempDir};

/// Short enough to renew within the test: with the CA's 60 s of clock-skew
/// allowance the lifetime is 105 s, so renewal is due 10 s after issue.
const OPERATOR_TTL: &str = "45s";

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `flottectl ARGS -o json` with `profile`, expected to succeed.
fn json_as(server: &Server, profile: &Path, args: &[&str]) -> (serde_json::Value, String) {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let output = flottectl(profile, &server.address, &all);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        stderr_of(&output)
    );
    (
        serde_json::from_slice(&output.stdout).expect("JSON output"),
        stderr_of(&output),
    )
}

/// The stored serial of operator `name`, as the admin API lists it.
fn stored_serial(server: &Server, profile: &Path, name: &str) -> String {
    let (operators, _) = json_as(server, profile, &["operator", "list"]);
    operators
        .as_array()
        .unwrap()
        .iter()
        .find(|operator| operator["name"] == name)
        .and_then(|operator| operator["certificate_serial"].as_str())
        .unwrap()
        .to_owned()
}

/// `flotte-server admin-profile --data-dir … --out OUT`, as on the server host.
fn admin_profile(server: &Server, out: &Path) -> Output {
    Command::new(binary("flotte-server"))
        .arg("admin-profile")
        .arg("--data-dir")
        .arg(&server.data_dir)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn an_operator_certificate_renews_itself_on_demand_never_once_revoked_and_an_admin_is_recovered() {
    let root = TempDir::new("flotte-e2e").unwrap();
    let mut server = Server::init(root.path(), "server", &[]);
    server.append_config(&format!("operator_certificate_ttl = \"{OPERATOR_TTL}\""));
    server.start();
    let olga = server.create_operator(root.path(), "olga", "viewer");
    let first_certificate = read(&olga.join("cert.pem"));
    let key = read(&olga.join("key.pem"));
    let first_serial = stored_serial(&server, &olga, "olga");

    // Fresh: no renewal yet, but a certificate this short is warned about.
    let (_, stderr) = json_as(&server, &olga, &["machines", "list"]);
    assert!(
        stderr.contains("warning") && stderr.contains("expires at"),
        "{stderr}"
    );
    assert_eq!(read(&olga.join("cert.pem")), first_certificate);

    // Once a third of the lifetime is left, an ordinary command renews first.
    let renewed = wait_until(Duration::from_secs(40), || {
        json_as(&server, &olga, &["machines", "list"]);
        read(&olga.join("cert.pem")) != first_certificate
    });
    assert!(renewed, "the certificate was never renewed");
    assert_eq!(read(&olga.join("key.pem")), key, "renewal keeps the key");
    let second_serial = stored_serial(&server, &olga, "olga");
    assert_ne!(second_serial, first_serial, "the new serial is on record");

    // On demand, whatever is left.
    let (answer, _) = json_as(&server, &olga, &["operator", "renew"]);
    let third_serial = answer["certificate_serial"].as_str().unwrap().to_owned();
    assert_ne!(third_serial, second_serial);
    assert_eq!(stored_serial(&server, &olga, "olga"), third_serial);

    // Recovery: the admin's profile is lost; the server host mints another.
    std::fs::remove_dir_all(server.admin_profile()).unwrap();
    let recovered = root.path().join("recovered");
    let minted = admin_profile(&server, &recovered);
    assert!(minted.status.success(), "{}", stderr_of(&minted));
    let again = admin_profile(&server, &recovered);
    assert!(
        !again.status.success() && stderr_of(&again).contains("already holds a profile"),
        "never over an existing profile: {}",
        stderr_of(&again)
    );
    // The recovered admin acts as an admin: it revokes olga.
    json_as(&server, &recovered, &["operator", "revoke", "olga"]);
    let refused = flottectl(&olga, &server.address, &["operator", "renew"]);
    assert!(
        !refused.status.success() && stderr_of(&refused).contains("revoked"),
        "{}",
        stderr_of(&refused)
    );

    let (entries, _) = json_as(&server, &recovered, &["audit", "list"]);
    let actions: Vec<(String, String)> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            (
                entry["actor"].as_str().unwrap().to_owned(),
                entry["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let renewals_by_olga = actions
        .iter()
        .filter(|(actor, action)| actor == "olga" && action == "operator.renew")
        .count();
    // The revoked one was refused at the handshake: no call, no entry.
    assert_eq!(renewals_by_olga, 2, "{actions:?}");
    assert!(
        actions.contains(&(
            "flotte-server admin-profile".to_owned(),
            "operator.renew".to_owned()
        )),
        "{actions:?}"
    );
}
