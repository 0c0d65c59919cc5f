//! The Debian packages, installed for real: `deploy/debian/build-packages`
//! packages the binaries this test run already built (no release build) with
//! cargo-deb, `dpkg -i` installs them on this machine, and the test checks
//! what an operator gets — files, owners, modes, the conffile, the `flotte`
//! user, each binary's `--version`, the units (`systemd-analyze verify`) —
//! then that a reinstall keeps an edited conffile and the data, that remove
//! keeps the configuration and purge does not. A guard purges the packages
//! and removes the users and directories they made even when a check fails.
//!
//! It needs root, dpkg and cargo-deb (`.ci/run` installs it); without them
//! it fails, unless `FLOTTE_TEST_SKIP_PACKAGES=1` asks to skip. It refuses
//! to run where a Flotte package or its directories already exist: it would
//! remove them.
//!
//! The units' `systemd-analyze security` exposure is held to its goals here
//! too (server ≤ 1.5, agent ≤ 5.0; figures in deploy/INSTALL.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use flotte_tests::sample_fleet::{
    prepare_sample_machine, push_sample_image, set_image_everywhere, trust_new_release_key,
    Behaviour,
};
use flotte_tests::{wait_until, TempDir};

const SKIP_VARIABLE: &str = "FLOTTE_TEST_SKIP_PACKAGES";
const PACKAGES: [&str; 3] = ["flotte-server", "flotte-agent", "flottectl"];
/// The system users the maintainer scripts create.
const USERS: [&str; 2] = ["flotte", "flotte-svc"];
/// What the packages create outside dpkg's own file list.
const MADE_BY_SCRIPTS: [&str; 3] = [
    "/var/lib/flotte-server",
    "/var/lib/flotte-agent",
    "/etc/flotte",
];
const AGENT_CONFFILE: &str = "/etc/flotte/agent.toml";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn succeeds(program: &str, arguments: &[&str]) -> bool {
    Command::new(program)
        .args(arguments)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Runs a command that must succeed; its output.
fn run(program: &str, arguments: &[&str]) -> Output {
    let output = Command::new(program)
        .args(arguments)
        .stdin(Stdio::null())
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {arguments:?}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout_of(program: &str, arguments: &[&str]) -> String {
    String::from_utf8_lossy(&run(program, arguments).stdout).into_owned()
}

/// Whether the missing prerequisite `reason` skips the test (only when
/// FLOTTE_TEST_SKIP_PACKAGES=1); fails naming it otherwise.
fn skip_for_missing(reason: &str) -> bool {
    assert!(
        std::env::var(SKIP_VARIABLE).as_deref() == Ok("1"),
        "this test needs {reason}; set {SKIP_VARIABLE}=1 to skip it explicitly"
    );
    println!("SKIPPED ({SKIP_VARIABLE}=1): needs {reason}");
    true
}

fn missing_packaging_tools() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (dpkg -i installs on this machine)");
    }
    if !succeeds("dpkg", &["--version"]) || !succeeds("dpkg-query", &["--version"]) {
        missing.push("dpkg");
    }
    if !succeeds("cargo", &["deb", "--version"]) {
        missing.push("cargo-deb (cargo install --locked cargo-deb --version 3.8.0)");
    }
    if !Path::new("/usr/sbin/adduser").exists() {
        missing.push("adduser (apt-get install adduser)");
    }
    missing
}

/// dpkg's status of a package ("install ok installed", "deinstall ok
/// config-files"), or "" when dpkg does not know it.
fn package_status(package: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Whether a [`package_status`] says nothing of the package is installed.
fn is_gone(status: &str) -> bool {
    status.is_empty() || status.ends_with("not-installed")
}

/// The passwd entry of `user`, split into its fields.
fn passwd_entry(user: &str) -> Option<Vec<String>> {
    let output = Command::new("getent")
        .args(["passwd", user])
        .output()
        .ok()?;
    output.status.success().then(|| {
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .split(':')
            .map(str::to_owned)
            .collect()
    })
}

/// Leaves the machine as it found it, failure or not: purges the packages,
/// then removes the users and directories the test caused.
struct MachineLeftClean {
    users_created: Vec<&'static str>,
}

impl MachineLeftClean {
    fn new() -> Self {
        for package in PACKAGES {
            let status = package_status(package);
            assert!(
                is_gone(&status),
                "{package} is already on this machine ({status}): this test installs and \
                 purges it, so it runs only where Flotte is not installed"
            );
        }
        for path in MADE_BY_SCRIPTS {
            assert!(
                !Path::new(path).exists(),
                "{path} exists: this test would change or remove it, so it runs only where \
                 Flotte is not installed"
            );
        }
        MachineLeftClean {
            users_created: USERS
                .into_iter()
                .filter(|user| passwd_entry(user).is_none())
                .collect(),
        }
    }
}

impl Drop for MachineLeftClean {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .arg("--purge")
            .args(PACKAGES)
            .stdin(Stdio::null())
            .output();
        for user in &self.users_created {
            let _ = Command::new("userdel").arg(user).output();
            let _ = Command::new("groupdel").arg(user).output();
        }
        for path in MADE_BY_SCRIPTS {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// Builds the three packages from the binaries of this test run.
fn build_packages(out: &Path) -> Vec<PathBuf> {
    for binary in PACKAGES {
        flotte_tests::binary(binary);
    }
    let binaries = flotte_tests::binaries_directory();
    let profile = match binaries.file_name().and_then(|name| name.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(profile) => profile.to_owned(),
    };
    let target = binaries.parent().expect("a target directory").to_path_buf();
    let output = Command::new(workspace_root().join("deploy/debian/build-packages"))
        .args(["--no-build", "--profile", &profile, "--out"])
        .arg(out)
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .output()
        .expect("run deploy/debian/build-packages");
    assert!(
        output.status.success(),
        "build-packages: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let debs: Vec<PathBuf> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(debs.len(), PACKAGES.len(), "one .deb per package: {debs:?}");
    for (deb, package) in debs.iter().zip(PACKAGES) {
        let name = deb.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            deb.exists() && name.starts_with(&format!("{package}_")),
            "{}",
            deb.display()
        );
    }
    debs
}

fn dpkg_install(debs: &[PathBuf]) {
    let mut arguments = vec!["-i".to_owned()];
    arguments.extend(debs.iter().map(|deb| deb.display().to_string()));
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    run("dpkg", &arguments);
}

/// Owner uid and permission bits of a path, which must exist.
fn owner_and_mode(path: &str) -> (u32, u32) {
    let metadata = std::fs::metadata(path).unwrap_or_else(|error| panic!("{path}: {error}"));
    (metadata.uid(), metadata.permissions().mode() & 0o7777)
}

fn assert_owner_and_mode(path: &str, uid: u32, mode: u32) {
    assert_eq!(
        owner_and_mode(path),
        (uid, mode),
        "{path}: (owner uid, mode) in octal {mode:o} expected"
    );
}

fn system_user(user: &str) -> Vec<String> {
    let entry = passwd_entry(user).unwrap_or_else(|| panic!("no user {user}"));
    let uid: u32 = entry[2].parse().unwrap();
    assert!(
        uid > 0 && uid < 1000,
        "{user} is not a system user: {entry:?}"
    );
    assert_eq!(
        entry[6], "/usr/sbin/nologin",
        "{user} can log in: {entry:?}"
    );
    assert!(
        succeeds("getent", &["group", user]),
        "{user} has no group of its own"
    );
    entry
}

fn check_installed() {
    for package in PACKAGES {
        assert_eq!(package_status(package), "install ok installed", "{package}");
        let binary = format!("/usr/bin/{package}");
        assert_owner_and_mode(&binary, 0, 0o755);
        assert_eq!(
            stdout_of(&binary, &["--version"]),
            format!("{package} {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
    // The units are deploy/'s, unchanged (their ExecStart= is a bare name
    // that systemd finds in /usr/bin).
    for unit in ["flotte-server.service", "flotte-agent.service"] {
        let installed = format!("/usr/lib/systemd/system/{unit}");
        assert_eq!(
            std::fs::read_to_string(&installed).unwrap(),
            std::fs::read_to_string(workspace_root().join("deploy").join(unit)).unwrap(),
            "{installed}"
        );
        assert_owner_and_mode(&installed, 0, 0o644);
    }

    let flotte = system_user("flotte");
    assert_eq!(flotte[5], "/var/lib/flotte-server", "{flotte:?}");
    let flotte_uid: u32 = flotte[2].parse().unwrap();
    system_user("flotte-svc");
    assert_owner_and_mode("/var/lib/flotte-server", flotte_uid, 0o700);
    assert_owner_and_mode("/var/lib/flotte-agent", 0, 0o711);
    assert_owner_and_mode("/etc/flotte/authorized_keys", 0, 0o755);

    let conffiles = stdout_of("dpkg-query", &["-W", "-f=${Conffiles}", "flotte-agent"]);
    assert!(
        conffiles
            .lines()
            .any(|line| line.trim_start().starts_with(&format!("{AGENT_CONFFILE} "))),
        "{AGENT_CONFFILE} is not a conffile: {conffiles:?}"
    );
    assert_owner_and_mode(AGENT_CONFFILE, 0, 0o644);
    assert_eq!(
        std::fs::read_to_string(AGENT_CONFFILE).unwrap(),
        std::fs::read_to_string(workspace_root().join("deploy/agent.toml")).unwrap()
    );
    assert!(
        std::fs::read_to_string("/usr/share/bash-completion/completions/flottectl")
            .unwrap()
            .contains("_flottectl"),
        "flottectl's bash completion"
    );
    for completion in [
        "/usr/share/zsh/vendor-completions/_flottectl",
        "/usr/share/fish/vendor_completions.d/flottectl.fish",
        "/usr/share/man/man1/flottectl.1.gz",
        "/usr/share/man/man1/flottectl-rollout-create.1.gz",
    ] {
        assert_owner_and_mode(completion, 0, 0o644);
    }
}

/// `systemd-analyze verify` of the installed units, where systemd-analyze
/// exists (as in deploy_examples.rs, any line naming the unit is a failure).
fn verify_installed_units() {
    if !succeeds("systemd-analyze", &["--version"]) {
        println!("systemd-analyze is missing: the installed units are not verified");
        return;
    }
    for unit in ["flotte-server.service", "flotte-agent.service"] {
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("/usr/lib/systemd/system/{unit}"))
            .output()
            .expect("run systemd-analyze verify");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let complaints: Vec<&str> = text.lines().filter(|line| line.contains(unit)).collect();
        assert!(
            output.status.success() && complaints.is_empty(),
            "systemd-analyze verify {unit}: {}\n{}",
            output.status,
            complaints.join("\n")
        );
    }
}

#[test]
fn packages_install_upgrade_remove_and_purge_cleanly() {
    let missing = missing_packaging_tools();
    if !missing.is_empty() && skip_for_missing(&missing.join(", ")) {
        return;
    }
    let guard = MachineLeftClean::new();
    let scratch = TempDir::new("flotte-packages").unwrap();
    let debs = build_packages(scratch.path());

    dpkg_install(&debs);
    check_installed();
    verify_installed_units();

    // The `flotte` user can initialise its data dir with the installed
    // binary: the owner and mode the package gave it are the right ones.
    run(
        "runuser",
        &[
            "-u",
            "flotte",
            "--",
            "/usr/bin/flotte-server",
            "init",
            "--data-dir",
            "/var/lib/flotte-server",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let flotte_uid: u32 = system_user("flotte")[2].parse().unwrap();
    assert_owner_and_mode("/var/lib/flotte-server/ca/ca.key", flotte_uid, 0o600);

    // Reinstalling (as an upgrade does) keeps the users, the data and an
    // operator's edit of the conffile.
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string(AGENT_CONFFILE).unwrap()
    );
    std::fs::write(AGENT_CONFFILE, &edited).unwrap();
    dpkg_install(&debs);
    assert_eq!(system_user("flotte")[2], flotte_uid.to_string());
    assert_eq!(std::fs::read_to_string(AGENT_CONFFILE).unwrap(), edited);
    assert!(Path::new("/var/lib/flotte-server/ca/ca.key").exists());
    assert_owner_and_mode("/var/lib/flotte-server", flotte_uid, 0o700);

    // Remove: the programs go, the configuration and the data stay.
    let mut arguments = vec!["--remove"];
    arguments.extend(PACKAGES);
    run("dpkg", &arguments);
    for package in PACKAGES {
        let status = package_status(package);
        if package == "flottectl" {
            // No conffile: nothing of it is left.
            assert!(is_gone(&status), "{package}: {status}");
        } else {
            assert_eq!(status, "deinstall ok config-files", "{package}");
        }
        assert!(!Path::new(&format!("/usr/bin/{package}")).exists());
    }
    assert_eq!(std::fs::read_to_string(AGENT_CONFFILE).unwrap(), edited);
    assert!(Path::new("/etc/flotte/authorized_keys").is_dir());

    // Purge: the configuration goes too; the server's data (its CA) and the
    // users stay, on purpose (see deploy/debian/flotte-server/postrm).
    let mut arguments = vec!["--purge"];
    arguments.extend(PACKAGES);
    run("dpkg", &arguments);
    for package in PACKAGES {
        let status = package_status(package);
        assert!(is_gone(&status), "{package}: {status}");
    }
    assert!(!Path::new("/etc/flotte").exists(), "/etc/flotte is left");
    assert!(Path::new("/var/lib/flotte-server/ca/ca.key").exists());
    assert!(passwd_entry("flotte").is_some());

    drop(guard);
    for path in MADE_BY_SCRIPTS {
        assert!(!Path::new(path).exists(), "{path} is left behind");
    }
}

/// The overall exposure `systemd-analyze security --offline=true` gives a
/// unit ("→ Overall exposure level for flotte-agent.service: 2.6 OK 🙂").
fn exposure(unit: &Path) -> f64 {
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit)
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| {
            let (_, figure) = line.split_once("Overall exposure level for ")?;
            figure.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no exposure level for {}:\n{text}", unit.display()))
}

#[test]
fn units_stay_within_their_exposure_goals() {
    if !succeeds("systemd-analyze", &["--version"])
        && skip_for_missing("systemd-analyze (apt-get install systemd)")
    {
        return;
    }
    let deploy = workspace_root().join("deploy");
    let server = exposure(&deploy.join("flotte-server.service"));
    let agent = exposure(&deploy.join("flotte-agent.service"));
    assert!(
        server <= 1.5,
        "flotte-server.service exposure {server} > 1.5"
    );
    assert!(agent <= 5.0, "flotte-agent.service exposure {agent} > 5.0");
}

/// Capability numbers (linux/capability.h) of the names the agent's unit
/// may keep; a name missing here fails the test until it is taught.
const CAPABILITY_NUMBERS: [(&str, u32); 8] = [
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_FOWNER", 3),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_NET_BIND_SERVICE", 10),
];

/// The capability names of the agent unit's `CapabilityBoundingSet=`.
fn agent_unit_capabilities() -> Vec<String> {
    let unit =
        std::fs::read_to_string(workspace_root().join("deploy/flotte-agent.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix("CapabilityBoundingSet="))
        .expect("the agent unit sets CapabilityBoundingSet=");
    line.split_whitespace().map(str::to_owned).collect()
}

/// A field of /proc/PID/status ("CapEff", "NoNewPrivs").
fn process_status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// Whether the hardened-agent tests must skip: they need root and setpriv.
fn skip_without_setpriv() -> bool {
    (!nix::unistd::geteuid().is_root() && skip_for_missing("root (to drop capabilities)"))
        || (!succeeds("setpriv", &["--version"])
            && skip_for_missing("setpriv (apt-get install util-linux)"))
}

/// Writes `<directory>/hardened-agent`, which runs the agent binary with
/// only the capabilities of the unit's `CapabilityBoundingSet=` and no new
/// privileges, as systemd would; returns it and the capability mask the
/// agent must then hold.
fn hardened_agent(directory: &Path) -> (PathBuf, u64) {
    let mut mask = 0u64;
    let mut setpriv_set = String::from("-all");
    for name in agent_unit_capabilities() {
        let (_, number) = CAPABILITY_NUMBERS
            .iter()
            .find(|(known, _)| *known == name)
            .unwrap_or_else(|| panic!("{name}: teach CAPABILITY_NUMBERS its number"));
        mask |= 1 << number;
        setpriv_set.push_str(&format!(
            ",+{}",
            name.trim_start_matches("CAP_").to_lowercase()
        ));
    }
    let wrapper = directory.join("hardened-agent");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --no-new-privs --inh-caps=-all --bounding-set={setpriv_set} -- {} \"$@\"\n",
            flotte_tests::binary("flotte-agent").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    (wrapper, mask)
}

/// The agent's unit cannot run under systemd here (systemd is not PID 1 in
/// CI), so what it takes away that could break a swap is applied the same
/// way by `setpriv`: the bounding set of `CapabilityBoundingSet=` (read from
/// the unit) and `NoNewPrivileges=`. The real agent then swaps a real image
/// and starts its service as another user (`nobody`), health-gated. The
/// mount namespace and system-call filter parts of the unit are checked by
/// `systemd-analyze verify` only (deploy/INSTALL.md, "Hardening").
#[test]
fn the_agent_swaps_images_with_only_the_capabilities_its_unit_keeps() {
    if skip_without_setpriv() {
        return;
    }
    let root = TempDir::new("flotte-hardened-agent").unwrap();
    let mut server = flotte_tests::Server::init(root.path(), "server", &[]);
    server.start();
    let keys = trust_new_release_key(&server, root.path());
    for version in ["1.0.0", "2.0.0"] {
        push_sample_image(&server, root.path(), &keys, version, Behaviour::Healthy);
    }
    let (wrapper, expected_mask) = hardened_agent(root.path());
    let mut machine = prepare_sample_machine(
        &server,
        &[],
        root.path(),
        &keys,
        "hardened-1",
        "dc1",
        "env=prod",
    );
    machine.agent.binary = Some(wrapper);
    machine.agent.start();
    assert!(
        wait_until(Duration::from_secs(60), || server.connected_count() == 1),
        "the hardened agent did not connect:\n{}",
        machine.agent.log()
    );

    // The agent really runs with only those rights.
    let pid = machine
        .agent
        .process
        .as_ref()
        .and_then(|process| process.pid())
        .unwrap();
    assert_eq!(
        u64::from_str_radix(&process_status_field(pid, "CapEff"), 16).unwrap(),
        expected_mask,
        "effective capabilities of the agent (kept: {:?})",
        agent_unit_capabilities()
    );
    assert_eq!(process_status_field(pid, "NoNewPrivs"), "1");

    // A first image, then a second one, which stops the first one's service
    // (running as another user) before starting its own.
    for version in ["1.0.0", "2.0.0"] {
        set_image_everywhere(&server, std::slice::from_ref(&machine), version);
        assert_eq!(
            machine.serves(),
            Some(format!("v{version}")),
            "{}",
            machine.agent.log()
        );
    }
    // Verifying the running tree reads every file of it.
    let verified = server.ctl_json(&["machines", "verify", "hardened-1", "--timeout", "60s"]);
    assert_eq!(verified[0]["result"], "clean", "{verified}");
    machine.agent.kill();
    server.kill();
}

/// Removes a test's Unix login (and its home) when dropped.
struct LoginRemoved(&'static str);

impl Drop for LoginRemoved {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["--remove", self.0]).output();
    }
}

/// The fingerprint `ssh-keygen -lf` gives a public key file.
fn fingerprint(public_key: &Path) -> String {
    let listed = stdout_of("ssh-keygen", &["-lf", public_key.to_str().unwrap()]);
    listed.split_whitespace().nth(1).unwrap().to_owned()
}

/// The drift scan of `access report` reads `~/.ssh/authorized_keys` of a
/// login whose home only that login may enter (0700) and whose file is its
/// own (0600): what `CAP_DAC_READ_SEARCH` is kept for in the agent's unit.
#[test]
fn the_hardened_agent_reads_private_homes_for_the_drift_report() {
    if skip_without_setpriv() {
        return;
    }
    if !Path::new("/usr/bin/ssh-keygen").exists()
        && skip_for_missing("ssh-keygen (apt-get install openssh-client)")
    {
        return;
    }
    let login = "flotte-hardened";
    let _removed = LoginRemoved(login);
    let home = flotte_tests::ensure_login(login);
    let root = TempDir::new("flotte-hardened-access").unwrap();
    let mut server = flotte_tests::Server::init(root.path(), "server", &[]);
    server.start();
    let (wrapper, _) = hardened_agent(root.path());
    let token = server.token("role=web", "dc1", &[]);
    let managed = root.path().join("authorized_keys");
    let mut agent = flotte_tests::Agent::new(root.path(), "web-1", &server.address, &token)
        .with_config(&format!(
            "[access]\nauthorized_keys_dir = \"{}\"\n",
            managed.display()
        ));
    agent.binary = Some(wrapper);
    agent.start();
    assert!(
        wait_until(Duration::from_secs(60), || server.connected_count() == 1),
        "the hardened agent did not connect:\n{}",
        agent.log()
    );
    server.grant_new_user_on_web(root.path(), "alice", login, &[]);

    // A key planted by hand, private to the login.
    let stranger = root.path().join("stranger");
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            stranger.to_str().unwrap(),
        ],
    );
    let stranger_public = stranger.with_extension("pub");
    let ssh = home.join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    std::fs::copy(&stranger_public, ssh.join("authorized_keys")).unwrap();
    let uid: u32 = stdout_of("id", &["-u", login]).trim().parse().unwrap();
    let gid: u32 = stdout_of("id", &["-g", login]).trim().parse().unwrap();
    for (path, mode) in [
        (ssh.join("authorized_keys"), 0o600),
        (ssh.clone(), 0o700),
        (home.clone(), 0o700),
    ] {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    let wanted = fingerprint(&stranger_public);
    let mut report = serde_json::Value::Null;
    let flagged = wait_until(Duration::from_secs(60), || {
        report = server.ctl_json(&["access", "report", "--machine", "web-1"]);
        report["entries"].as_array().is_some_and(|entries| {
            entries
                .iter()
                .any(|entry| entry["drift"] == true && entry["fingerprint"] == wanted.as_str())
        })
    });
    assert!(
        flagged,
        "the planted key is not flagged: {report:#}\n{}",
        agent.log()
    );
    agent.kill();
    server.kill();
}
