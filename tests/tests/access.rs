//! End-to-end tests of access for people, with a REAL `sshd` on a loopback
//! port configured with the drop-ins shipped in `deploy/sshd/`: grants reach
//! the machines their selector names (and no others), a `user revoke` ends
//! logins within moments (the time is measured and printed), a grant that
//! expires while the server is down is refused by the agent on its own, and
//! a hand-planted key shows up as drift in `access report`.
//!
//! These tests need root (they create Unix logins with `useradd` and run
//! sshd) and `openssh-server`/`openssh-client` (installed by `.ci/run`).
//! Without them they fail and say why, unless `FLOTTE_TEST_SKIP_SSHD=1`
//! asks to skip them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use flotte_tests::sample_fleet::free_port;
use flotte_tests::{
    assert_sshd_accepts, binary, ensure_login, skip_for_missing_sshd, spawn_managed, wait_until,
    Agent, ManagedChild, Server, TempDir, SKIP_SSHD_VARIABLE,
};

const SSHD: &str = "/usr/sbin/sshd";
/// Generous: a loaded 2-core machine, debug binaries.
const PATIENCE: Duration = Duration::from_secs(60);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Why these tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some(format!(
            "{SSHD} is missing (apt-get install openssh-server)"
        ));
    }
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not running as root (needed for useradd and sshd)".into());
    }
    for tool in ["ssh", "ssh-keygen", "useradd"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|output| output.status.success());
        if !found {
            return Some(format!("{tool} is missing (openssh-client / passwd)"));
        }
    }
    None
}

macro_rules! require_sshd {
    () => {
        if let Some(reason) = missing_prerequisite() {
            if skip_for_missing_sshd(&reason, std::env::var(SKIP_SSHD_VARIABLE).ok().as_deref()) {
                return;
            }
        }
    };
}

#[test]
fn a_missing_sshd_fails_unless_skipping_is_asked_for_explicitly() {
    let reason = "/usr/sbin/sshd is missing";
    for not_asked in [None, Some("0"), Some(""), Some("yes")] {
        let outcome = std::panic::catch_unwind(|| skip_for_missing_sshd(reason, not_asked));
        let message = outcome.expect_err("a missing sshd must fail the test");
        let message = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            message.contains(reason) && message.contains(SKIP_SSHD_VARIABLE),
            "{message}"
        );
    }
    assert!(skip_for_missing_sshd(reason, Some("1")));
}

/// A directory under /run (root-owned 0755 all the way up): sshd's
/// StrictModes refuses key files below /tmp (mode 1777).
struct RootOwnedDir(PathBuf);

impl RootOwnedDir {
    fn new(prefix: &str) -> Self {
        let path = PathBuf::from(format!("/run/{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        RootOwnedDir(path)
    }
}

impl Drop for RootOwnedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shipped drop-in with its paths pointed at this test's directories.
fn shipped_drop_in(name: &str, replacements: &[(&str, &str)]) -> String {
    let mut text =
        std::fs::read_to_string(workspace_root().join("deploy/sshd").join(name)).unwrap();
    for (from, to) in replacements {
        assert!(text.contains(from), "{name} no longer contains {from}");
        text = text.replace(from, to);
    }
    text
}

struct Sshd {
    port: u16,
    _process: ManagedChild,
}

impl Sshd {
    /// sshd -D -e -f CONFIG on a loopback port: its own host key, no PAM,
    /// public keys only, then `drop_in` (a shipped sshd drop-in).
    fn start(directory: &Path, drop_in: &str) -> Self {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let host_key = directory.join("host_key");
        if !host_key.exists() {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&host_key)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let port = free_port().unwrap();
        let config = directory.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 LogLevel VERBOSE\n{drop_in}\n",
                host_key.display(),
                directory.join("sshd.pid").display()
            ),
        )
        .unwrap();
        assert_sshd_accepts(Path::new(SSHD), &config, "the test's sshd config");
        let mut command = Command::new(SSHD);
        command.arg("-D").arg("-e").arg("-f").arg(&config);
        let process = spawn_managed(command, directory.join("sshd.log")).unwrap();
        assert!(
            wait_until(PATIENCE, || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "sshd did not listen: {}",
            process.log()
        );
        Sshd {
            port,
            _process: process,
        }
    }
}

/// `ssh -i KEY -p PORT LOGIN@127.0.0.1 true`: whether the login succeeded.
fn ssh_succeeds(key: &Path, port: u16, login: &str) -> bool {
    Command::new("ssh")
        .args(ssh_arguments(key, port, login, "true"))
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Arguments of a non-interactive ssh to LOGIN@127.0.0.1:PORT with KEY only.
fn ssh_arguments(key: &Path, port: u16, login: &str, remote_command: &str) -> Vec<String> {
    let port = port.to_string();
    let destination = format!("{login}@127.0.0.1");
    [
        "-F",
        "/dev/null",
        "-i",
        key.to_str().unwrap(),
        "-p",
        &port,
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=ERROR",
        &destination,
        remote_command,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

fn ssh_keygen(directory: &Path, name: &str) -> (PathBuf, PathBuf) {
    let private = directory.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&private)
        .status()
        .unwrap();
    assert!(status.success());
    let public = directory.join(format!("{name}.pub"));
    (private, public)
}

fn access_config(managed: &Path) -> String {
    format!(
        "[access]\nauthorized_keys_dir = \"{}\"\n",
        managed.display()
    )
}

/// One machine `web` (role=web, dc1) whose agent manages SSH keys with
/// `[access]` plus `extra_access_config`, and a real sshd reading them
/// through the shipped file-mode drop-in.
struct OneManagedMachine {
    root: TempDir,
    _keys_root: RootOwnedDir,
    server: Server,
    agent: Agent,
    managed: PathBuf,
    sshd: Sshd,
}

impl OneManagedMachine {
    fn start(extra_access_config: &str) -> Self {
        let root = TempDir::new("flotte-access").unwrap();
        let keys_root = RootOwnedDir::new("flotte-access-keys");
        let mut server = Server::init(root.path(), "server", &[]);
        server.start();
        let managed = keys_root.0.join("web").join("authorized_keys");
        let token = server.token("role=web", "dc1", &[]);
        let config = format!("{}{extra_access_config}", access_config(&managed));
        let mut agent =
            Agent::new(root.path(), "web", &server.address, &token).with_config(&config);
        agent.start();
        assert!(wait_until(PATIENCE, || server.connected_count() == 1));
        let sshd_directory = keys_root.0.join("sshd");
        std::fs::create_dir_all(&sshd_directory).unwrap();
        let sshd = Sshd::start(
            &sshd_directory,
            &shipped_drop_in(
                "flotte-authorized-keys-file.conf",
                &[("/etc/flotte/authorized_keys", managed.to_str().unwrap())],
            ),
        );
        OneManagedMachine {
            root,
            _keys_root: keys_root,
            server,
            agent,
            managed,
            sshd,
        }
    }
}

/// Waits until every machine applied the current access policy version.
fn wait_all_applied(server: &Server, machines: usize) -> serde_json::Value {
    let mut status = serde_json::Value::Null;
    let applied = wait_until(PATIENCE, || {
        status = server.ctl_json(&["access", "status"]);
        status["applied"].as_u64() == Some(machines as u64)
    });
    assert!(applied, "not every machine applied the policy: {status:#}");
    status
}

/// `access grant USER --selector role=web --login LOGIN EXTRA…`.
fn grant_on_web(server: &Server, user: &str, login: &str, extra: &[&str]) -> serde_json::Value {
    let mut arguments = vec![
        "access",
        "grant",
        user,
        "--selector",
        "role=web",
        "--login",
        login,
    ];
    arguments.extend_from_slice(extra);
    server.ctl_json(&arguments)
}

fn rfc3339_in(seconds: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(seconds)).to_string()
}

#[test]
fn grants_follow_selectors_revocation_ends_logins_and_drift_is_reported() {
    require_sshd!();
    let login = "flottealice";
    let home = ensure_login(login);
    let root = TempDir::new("flotte-access").unwrap();
    let keys_root = RootOwnedDir::new("flotte-access-keys");
    let mut server = Server::init(root.path(), "server", &[]);
    server.start();

    // web-1: file mode, ends live sessions on revocation; web-2: command
    // mode; db-1: file mode.
    let mut machines = Vec::new();
    for (name, labels) in [
        ("web-1", "role=web"),
        ("web-2", "role=web"),
        ("db-1", "role=db"),
    ] {
        let managed = keys_root.0.join(name).join("authorized_keys");
        let token = server.token(labels, "dc1", &[]);
        let mut config = access_config(&managed);
        if name == "web-1" {
            config.push_str("terminate_sessions = true\n");
        }
        let mut agent = Agent::new(root.path(), name, &server.address, &token).with_config(&config);
        agent.start();
        machines.push((name, agent, managed));
    }
    assert!(
        wait_until(PATIENCE, || server.connected_count() == 3),
        "{}",
        server.log()
    );
    let sshd_dir = |name: &str| {
        let directory = keys_root.0.join(format!("sshd-{name}"));
        std::fs::create_dir_all(&directory).unwrap();
        directory
    };
    let web1 = Sshd::start(
        &sshd_dir("web-1"),
        &shipped_drop_in(
            "flotte-authorized-keys-file.conf",
            &[(
                "/etc/flotte/authorized_keys",
                machines[0].2.to_str().unwrap(),
            )],
        ),
    );
    let agent_binary = binary("flotte-agent");
    let command = format!(
        "{} authorized-keys --data-dir {}",
        agent_binary.display(),
        machines[1].1.data_dir.display()
    );
    let web2 = Sshd::start(
        &sshd_dir("web-2"),
        &shipped_drop_in(
            "flotte-authorized-keys-command.conf",
            &[(
                "/usr/local/bin/flotte-agent authorized-keys --config /etc/flotte/agent.toml",
                &command,
            )],
        ),
    );
    let db1 = Sshd::start(
        &sshd_dir("db-1"),
        &shipped_drop_in(
            "flotte-authorized-keys-file.conf",
            &[(
                "/etc/flotte/authorized_keys",
                machines[2].2.to_str().unwrap(),
            )],
        ),
    );

    let (alice_key, alice_pub) = ssh_keygen(root.path(), "alice_key");
    let garbage = root.path().join("garbage.pub");
    std::fs::write(&garbage, "ssh-ed25519 bm90IGEga2V5 alice\n").unwrap();
    let refused = server.ctl(&[
        "user",
        "add",
        "alice",
        "--ssh-key",
        garbage.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("garbage.pub"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let user = server.ctl_json(&[
        "user",
        "add",
        "alice",
        "--ssh-key",
        alice_pub.to_str().unwrap(),
    ]);
    assert!(user["keys"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("SHA256:"));
    // An operator named alice too: off-boarding must revoke her as well.
    server.create_operator(root.path(), "alice", "viewer");

    let grant = grant_on_web(&server, "alice", login, &[]);
    assert_eq!(grant[0]["machines_matching"], 2);
    let status = wait_all_applied(&server, 3);
    let version = status["version"].as_u64().unwrap();

    assert!(
        wait_until(PATIENCE, || ssh_succeeds(&alice_key, web1.port, login)),
        "alice cannot log into web-1 (file mode):\n{}",
        machines[0].1.log()
    );
    assert!(
        wait_until(PATIENCE, || ssh_succeeds(&alice_key, web2.port, login)),
        "alice cannot log into web-2 (command mode):\n{}",
        machines[1].1.log()
    );
    // db-1 applied the same version and got nothing.
    assert!(!ssh_succeeds(&alice_key, db1.port, login));
    assert!(!machines[2].2.join(login).exists());
    let managed_file = std::fs::read_to_string(machines[0].2.join(login)).unwrap();
    assert!(managed_file.contains("flotte:user=alice"), "{managed_file}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(machines[0].2.join(login))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o644);

    // Drift: a key planted by hand in the login's own authorized_keys.
    let (_, stranger_pub) = ssh_keygen(root.path(), "stranger_key");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::copy(&stranger_pub, home.join(".ssh/authorized_keys")).unwrap();
    let stranger_fingerprint = String::from_utf8_lossy(
        &Command::new("ssh-keygen")
            .arg("-lf")
            .arg(&stranger_pub)
            .output()
            .unwrap()
            .stdout,
    )
    .split_whitespace()
    .nth(1)
    .unwrap()
    .to_owned();
    let mut report = serde_json::Value::Null;
    let flagged = wait_until(PATIENCE, || {
        report = server.ctl_json(&["access", "report", "--machine", "web-1"]);
        report["entries"].as_array().unwrap().iter().any(|entry| {
            entry["drift"] == true && entry["fingerprint"] == stranger_fingerprint.as_str()
        })
    });
    assert!(flagged, "the planted key is not flagged: {report:#}");
    let granted_found = report["entries"].as_array().unwrap().iter().any(|entry| {
        entry["user"] == "alice" && entry["granted"] == true && entry["found"] == true
    });
    assert!(granted_found, "{report:#}");
    std::fs::remove_file(home.join(".ssh/authorized_keys")).unwrap();

    // A live session on web-1, to be ended by the revocation.
    let mut live_session = Command::new("ssh")
        .args(ssh_arguments(&alice_key, web1.port, login, "sleep 600"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let session_is_live = wait_until(PATIENCE, || {
        Command::new("pgrep")
            .args(["-u", login, "-f", "sleep 600"])
            .output()
            .is_ok_and(|output| output.status.success())
    });
    assert!(session_is_live, "the live session did not start");

    // Off-boarding: one call, and the login is refused moments later.
    let revoke_output = server.ctl_json(&["user", "revoke", "alice"]);
    let returned = Instant::now();
    assert_eq!(revoke_output["grants_removed"], 1);
    assert_eq!(revoke_output["keys_removed"], 1);
    assert_eq!(revoke_output["operator"], "revoked");
    let revoked_version = revoke_output["policy_version"].as_u64().unwrap();
    assert!(revoked_version > version);
    let refused_in_time = wait_until(PATIENCE, || !ssh_succeeds(&alice_key, web1.port, login));
    let elapsed = returned.elapsed();
    assert!(refused_in_time, "alice can still log into web-1");
    println!(
        "user revoke returned -> ssh refused on web-1 after {} ms (includes one ssh attempt of the poll)",
        elapsed.as_millis()
    );
    assert!(wait_until(PATIENCE, || !ssh_succeeds(
        &alice_key, web2.port, login
    )));
    let ended = wait_until(PATIENCE, || live_session.try_wait().unwrap().is_some());
    if !ended {
        let _ = live_session.kill();
    }
    assert!(
        ended,
        "terminate_sessions did not end alice's live session on web-1"
    );
    let status = server.ctl_json(&[
        "access",
        "status",
        "--version",
        &revoked_version.to_string(),
    ]);
    assert!(
        status["applied"].as_u64().unwrap() + status["pending"].as_u64().unwrap() == 3,
        "{status:#}"
    );
    wait_all_applied(&server, 3);
    let operators = server.ctl_json(&["operator", "list"]);
    let alice_operator = operators
        .as_array()
        .unwrap()
        .iter()
        .find(|operator| operator["name"] == "alice")
        .unwrap();
    assert!(
        !alice_operator["revoked_at"].is_null(),
        "{alice_operator:#}"
    );

    // Every change is in the audit log.
    let audit = server.ctl_ok(&["audit", "list"]);
    for action in ["user.add", "access.grant", "user.revoke"] {
        assert!(
            audit.contains(action),
            "{action} missing from the audit log:\n{audit}"
        );
    }
}

#[test]
fn a_grant_that_expires_while_the_server_is_down_is_refused_by_the_agent() {
    require_sshd!();
    let login = "flottebob";
    ensure_login(login);
    let OneManagedMachine {
        root,
        _keys_root,
        mut server,
        mut agent,
        managed,
        sshd,
    } = OneManagedMachine::start("");
    let (bob_key, bob_pub) = ssh_keygen(root.path(), "bob_key");
    server.ctl_json(&["user", "add", "bob", "--ssh-key", bob_pub.to_str().unwrap()]);
    let expires = rfc3339_in(40);
    let expires_at = humantime::parse_rfc3339(&expires).unwrap();
    grant_on_web(&server, "bob", login, &["--expires", &expires]);
    assert!(
        wait_until(PATIENCE, || ssh_succeeds(&bob_key, sshd.port, login)),
        "bob cannot log in before expiry:\n{}",
        agent.log()
    );
    // sshd itself is told the expiry too (defence in depth).
    let managed_file = std::fs::read_to_string(managed.join(login)).unwrap();
    assert!(managed_file.contains("expiry-time=\""), "{managed_file}");
    server.kill();
    // Still in force after the server is gone, until expiry.
    if SystemTime::now() + Duration::from_secs(5) < expires_at {
        assert!(ssh_succeeds(&bob_key, sshd.port, login));
    }
    let refused = wait_until(Duration::from_secs(40) + PATIENCE, || {
        !ssh_succeeds(&bob_key, sshd.port, login)
    });
    assert!(
        refused,
        "bob can still log in after expiry:\n{}",
        agent.log()
    );
    assert!(
        SystemTime::now() >= expires_at,
        "refused before the grant expired"
    );
    assert!(!managed.join(login).exists());
    assert!(
        agent.is_running(),
        "the agent must keep running without its server"
    );
}

#[test]
fn fail_closed_removes_keys_after_the_server_is_gone_and_they_return_with_it() {
    require_sshd!();
    let login = "flottecarol";
    ensure_login(login);
    let OneManagedMachine {
        root,
        _keys_root,
        mut server,
        agent,
        managed,
        sshd,
    } = OneManagedMachine::start("on_disconnect = \"fail-closed\"\nfail_closed_after = \"5s\"\n");
    let (carol_key, carol_pub) = ssh_keygen(root.path(), "carol_key");
    server.ctl_json(&[
        "user",
        "add",
        "carol",
        "--ssh-key",
        carol_pub.to_str().unwrap(),
    ]);
    grant_on_web(&server, "carol", login, &[]);
    assert!(
        wait_until(PATIENCE, || ssh_succeeds(&carol_key, sshd.port, login)),
        "carol cannot log in:\n{}",
        agent.log()
    );

    server.kill();
    let killed = Instant::now();
    assert!(
        wait_until(PATIENCE, || !managed.join(login).exists()),
        "the agent did not fail closed:\n{}",
        agent.log()
    );
    let closed_after = killed.elapsed();
    // Whole seconds of contact time: the deadline falls 4 to 6 s after the cut.
    assert!(
        closed_after >= Duration::from_secs(3),
        "failed closed too early: {closed_after:?}"
    );
    assert!(!ssh_succeeds(&carol_key, sshd.port, login));
    println!("server killed -> keys removed (fail-closed after 5s) in {closed_after:?}");

    server.start();
    assert!(
        wait_until(PATIENCE, || ssh_succeeds(&carol_key, sshd.port, login)),
        "carol's access did not come back with the server:\n{}",
        agent.log()
    );
}

/// What a hostile login plants as its own `~/.ssh/authorized_keys`.
enum HostileKeysFile {
    Fifo,
    LinkTo(PathBuf),
}

impl HostileKeysFile {
    fn plant(&self, keys_file: &Path) {
        let _ = std::fs::remove_file(keys_file);
        match self {
            HostileKeysFile::Fifo => {
                let status = Command::new("mkfifo").arg(keys_file).status().unwrap();
                assert!(status.success(), "mkfifo {}", keys_file.display());
            }
            HostileKeysFile::LinkTo(target) => {
                std::os::unix::fs::symlink(target, keys_file).unwrap();
            }
        }
    }

    /// The words the agent's refusal uses for this file.
    fn refusal(&self) -> &'static str {
        match self {
            HostileKeysFile::Fifo => "is a FIFO, not a regular file",
            HostileKeysFile::LinkTo(_) => "is a symbolic link, never followed",
        }
    }
}

/// Whether the managed file sshd reads for `login` holds the key of
/// `public_key_line` (a cheap poll; sshd itself is asked once after).
fn managed_file_holds(managed: &Path, login: &str, public_key_line: &str) -> bool {
    let key = public_key_line
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::read_to_string(managed.join(login)).is_ok_and(|text| text.contains(&key))
}

#[test]
fn a_hostile_authorized_keys_file_never_delays_a_revocation_nor_leaks_a_file() {
    require_sshd!();
    let login = "flottemallory";
    let home = ensure_login(login);
    let OneManagedMachine {
        root,
        _keys_root,
        server,
        mut agent,
        managed,
        sshd,
    } = OneManagedMachine::start("");
    let ssh_directory = home.join(".ssh");
    std::fs::create_dir_all(&ssh_directory).unwrap();
    let status = Command::new("chown")
        .arg(format!("{login}:"))
        .arg(&ssh_directory)
        .status()
        .unwrap();
    assert!(status.success());
    let keys_file = ssh_directory.join("authorized_keys");
    // A root-only file holding a key line: with symbolic links followed,
    // the agent (root) would send its key to the server.
    let secret_key_line = "ssh-ed25519 AAAAsecretlyplantedbyroot root-only";
    let secret = root.path().join("root-only-keys");
    std::fs::write(&secret, format!("{secret_key_line}\n")).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let rounds = [
        ("fifo", HostileKeysFile::Fifo),
        ("zero", HostileKeysFile::LinkTo(PathBuf::from("/dev/zero"))),
        (
            "shadow",
            HostileKeysFile::LinkTo(PathBuf::from("/etc/shadow")),
        ),
        ("rootonly", HostileKeysFile::LinkTo(secret.clone())),
    ];
    for (round, hostile) in &rounds {
        let user = format!("mallory-{round}");
        let (private_key, public_key) = ssh_keygen(root.path(), &user);
        let public_key_line = std::fs::read_to_string(&public_key).unwrap();
        server.ctl_json(&[
            "user",
            "add",
            &user,
            "--ssh-key",
            public_key.to_str().unwrap(),
        ]);
        grant_on_web(&server, &user, login, &[]);
        assert!(
            wait_until(PATIENCE, || ssh_succeeds(&private_key, sshd.port, login)),
            "{user} cannot log in before the test starts:\n{}",
            agent.log()
        );

        // The agent scans the planted file (at each report) and says why
        // it did not read it: the refusal reaches `access report`.
        hostile.plant(&keys_file);
        let mut report = serde_json::Value::Null;
        let refusal_reported = wait_until(PATIENCE, || {
            report = server.ctl_json(&["access", "report", "--machine", "web"]);
            report["problems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|problem| {
                    problem["login"] == login
                        && problem["kind"] == "not-read"
                        && problem["subject"] == keys_file.to_str().unwrap()
                        && problem["reason"]
                            .as_str()
                            .unwrap()
                            .contains(hostile.refusal())
                })
        });
        assert!(
            refusal_reported,
            "{round}: the refused file is not reported: {report:#}\n{}",
            agent.log()
        );

        // Off-boarding still takes effect on this machine within a second.
        let revoked = server.ctl_json(&["user", "revoke", &user]);
        let returned = Instant::now();
        let revoked_version = revoked["policy_version"].as_u64().unwrap();
        let removed = wait_until(Duration::from_secs(1), || {
            !managed_file_holds(&managed, login, &public_key_line)
        });
        let elapsed = returned.elapsed();
        assert!(
            removed,
            "{round}: {user}'s key is still in force 1 s after the revocation:\n{}",
            agent.log()
        );
        assert!(
            !ssh_succeeds(&private_key, sshd.port, login),
            "{round}: sshd still accepts {user}'s key"
        );
        println!(
            "{round}: user revoke returned -> key gone from the managed file in {} ms",
            elapsed.as_millis()
        );
        // The agent stays responsive: it acknowledges the revocation and
        // keeps running.
        let mut status = serde_json::Value::Null;
        let acknowledged = wait_until(PATIENCE, || {
            status = server.ctl_json(&[
                "access",
                "status",
                "--version",
                &revoked_version.to_string(),
            ]);
            status["applied"].as_u64() == Some(1)
        });
        assert!(
            acknowledged,
            "{round}: the agent did not acknowledge: {status:#}"
        );
        assert!(
            agent.is_running(),
            "{round}: the agent died:\n{}",
            agent.log()
        );
    }

    // Nothing of the root-only files reached the server.
    let report = server.ctl_json(&["access", "report"]).to_string();
    assert!(
        !report.contains("secretlyplantedbyroot"),
        "a root-only file reached the server: {report}"
    );
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    for line in shadow.lines() {
        let hash = line.split(':').nth(1).unwrap_or_default();
        assert!(
            hash.len() < 3 || !report.contains(hash),
            "/etc/shadow reached the server: {report}"
        );
        assert!(!report.contains(line), "/etc/shadow reached the server");
    }
    let _ = std::fs::remove_file(&keys_file);
}

/// Problems of `access report` as (login, kind, subject, reason).
fn reported_problems(server: &Server) -> Vec<(String, String, String, String)> {
    let report = server.ctl_json(&["access", "report", "--machine", "web"]);
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|problem| {
            let field = |name: &str| problem[name].as_str().unwrap_or_default().to_owned();
            (
                field("login"),
                field("kind"),
                field("subject"),
                field("reason"),
            )
        })
        .collect()
}

#[test]
fn the_agent_refuses_root_keys_with_options_and_keys_with_a_newline_and_says_why() {
    require_sshd!();
    let login = "flottetrent";
    ensure_login(login);
    let OneManagedMachine {
        root,
        _keys_root,
        server,
        agent,
        managed,
        sshd,
    } = OneManagedMachine::start("");
    let key_text = |public: &Path| {
        std::fs::read_to_string(public)
            .unwrap()
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };

    // A grant of `root` is accepted by the server but refused by the agent.
    let (eve_key, eve_pub) = ssh_keygen(root.path(), "eve_key");
    server.ctl_json(&["user", "add", "eve", "--ssh-key", eve_pub.to_str().unwrap()]);
    grant_on_web(&server, "eve", "root", &[]);
    grant_on_web(&server, "eve", login, &[]);
    assert!(
        wait_until(PATIENCE, || ssh_succeeds(&eve_key, sshd.port, login)),
        "eve cannot log in as {login}:\n{}",
        agent.log()
    );

    // What a compromised server (here: someone writing its database) sends:
    // a key with `command="…"` options, and a key whose text holds a
    // newline followed by another key, which written verbatim would be a
    // line of its own in the managed file.
    let (options_key, options_pub) = ssh_keygen(root.path(), "options_key");
    let (carrier_key, carrier_pub) = ssh_keygen(root.path(), "carrier_key");
    let (smuggled_key, smuggled_pub) = ssh_keygen(root.path(), "smuggled_key");
    server.ctl_json(&[
        "user",
        "add",
        "mallet",
        "--ssh-key",
        options_pub.to_str().unwrap(),
        "--ssh-key",
        carrier_pub.to_str().unwrap(),
    ]);
    let database = rusqlite::Connection::open(flotte_server::store_path(&server.data_dir)).unwrap();
    database.busy_timeout(Duration::from_secs(10)).unwrap();
    let rewrite = |from: String, to: String| {
        let changed = database
            .execute(
                "UPDATE user_keys SET public_key = ?2 WHERE public_key = ?1",
                [&from, &to],
            )
            .unwrap();
        assert_eq!(changed, 1, "{from}");
    };
    rewrite(
        key_text(&options_pub),
        format!("command=\"/bin/true\" {}", key_text(&options_pub)),
    );
    rewrite(
        key_text(&carrier_pub),
        format!("{}\n{}", key_text(&carrier_pub), key_text(&smuggled_pub)),
    );
    // The grant makes the server read its (tampered) access data again.
    grant_on_web(&server, "mallet", login, &[]);

    let mut problems = Vec::new();
    let expected: [(&str, &str, &str); 3] = [
        ("root", "", "root is never managed"),
        (login, "\"command=", "options (command="),
        (login, "", "control character"),
    ];
    let all_reported = wait_until(PATIENCE, || {
        problems = reported_problems(&server);
        expected.iter().all(|(login, subject, reason)| {
            problems.iter().any(|problem| {
                problem.0 == *login
                    && problem.1 == "refused"
                    && problem.2.starts_with(subject)
                    && problem.3.contains(reason)
            })
        })
    });
    assert!(
        all_reported,
        "the agent's refusals are not all reported: {problems:#?}\n{}",
        agent.log()
    );
    let status = server.ctl_json(&["access", "status"]);
    assert_eq!(status["machines"][0]["refused"], 3, "{status:#}");

    // Nothing refused reached sshd; what is inside the boundary did.
    let managed_file = std::fs::read_to_string(managed.join(login)).unwrap();
    assert!(!managed_file.contains("command="), "{managed_file}");
    assert!(
        !managed_file.contains(&key_text(&smuggled_pub)),
        "{managed_file}"
    );
    assert!(!managed.join("root").exists());
    for (key, who) in [
        (&options_key, "the key with options"),
        (&carrier_key, "the key carrying a newline"),
        (&smuggled_key, "the key smuggled after the newline"),
    ] {
        assert!(
            !ssh_succeeds(key, sshd.port, login),
            "sshd accepts {who} for {login}"
        );
    }
    assert!(
        !ssh_succeeds(&eve_key, sshd.port, "root"),
        "sshd accepts eve's key for root"
    );
    assert!(ssh_succeeds(&eve_key, sshd.port, login));
}
