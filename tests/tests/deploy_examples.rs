//! Keeps `deploy/` honest: every example config parses and validates with the
//! real server and agent settings types, mentions every key those types
//! accept, and the systemd units are checked by `systemd-analyze verify` when
//! that tool exists (otherwise their ExecStart must at least name a binary
//! this workspace builds).

// Test code: a failed setup step must stop the test with its message, helpers
// included (clippy exempts only the #[test] functions themselves).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use flotte_agent::config::{read_config_file, AgentConfigFile};
use flotte_server::config::{read_toml, ServerConfigFile};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

/// Files directly in `deploy/` whose name ends with `suffix`, sorted.
fn deploy_files(suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("read deploy/")
        .map(|entry| entry.expect("read deploy/ entry").path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().ends_with(suffix))
        })
        .collect();
    files.sort();
    files
}

/// The keys a `deny_unknown_fields` settings type accepts, read from the error
/// serde gives for an unknown key ("expected one of `a`, `b`, ..."). Taken
/// from the real type, so a key added later must be documented in the example.
fn accepted_keys<T: for<'de> serde::Deserialize<'de> + std::fmt::Debug>() -> BTreeSet<String> {
    let error = toml::from_str::<T>("key_that_no_settings_type_has = 1")
        .expect_err("an unknown key must be refused")
        .to_string();
    let (_, expected) = error
        .split_once("expected")
        .unwrap_or_else(|| panic!("unexpected serde message: {error}"));
    let keys: BTreeSet<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!keys.is_empty(), "no key names in: {error}");
    keys
}

/// Fails unless every top-level key appears in `example` as `key =` or as a
/// table header (`[key]`, `[[key]]`), set or commented out (`# key =`), so
/// that the example documents all of them.
fn assert_documents_every_key(example: &Path, keys: &BTreeSet<String>) {
    let text = std::fs::read_to_string(example).expect("read example");
    let mentioned: BTreeSet<String> = text
        .lines()
        .map(|line| line.trim_start().trim_start_matches('#').trim_start())
        .filter_map(|line| {
            if line.starts_with('[') {
                // A table header, `[system]` or `[[check]]`, is the key of
                // the table (its first dotted segment).
                let name = line.trim_start_matches('[').split([']', '.']).next()?;
                Some(name.trim().to_owned())
            } else {
                line.split_once('=').map(|(key, _)| key.trim().to_owned())
            }
        })
        .collect();
    let missing: Vec<&String> = keys.difference(&mentioned).collect();
    assert!(
        missing.is_empty(),
        "{} does not document the keys {missing:?}",
        example.display()
    );
}

fn check_server_example(path: &Path) {
    let settings = read_toml::<ServerConfigFile>(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    settings
        .validate(PathBuf::from("/var/lib/flotte-server"))
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    assert_documents_every_key(path, &accepted_keys::<ServerConfigFile>());
}

/// The example names the production token path; validation reads that file,
/// so it is pointed at the example token shipped beside it instead
/// (`deploy/<file name>.example`), which must hold a well-formed token.
fn check_agent_example(path: &Path) {
    let mut settings =
        read_config_file(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    if let Some(token_file) = &settings.join_token_file {
        let file_name = token_file
            .file_name()
            .unwrap_or_else(|| panic!("{}: join_token_file has no file name", path.display()));
        let example_token = deploy_dir().join(format!("{}.example", file_name.to_string_lossy()));
        assert!(
            example_token.exists(),
            "{}: join_token_file {} needs an example token file {}",
            path.display(),
            token_file.display(),
            example_token.display()
        );
        settings.join_token_file = Some(example_token);
    }
    let config = settings
        .validate()
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    assert!(
        config.join_token.is_some(),
        "{}: the example should show how the join token is given",
        path.display()
    );
    assert_documents_every_key(path, &accepted_keys::<AgentConfigFile>());
}

#[test]
fn every_example_config_is_valid_and_complete() {
    let examples = deploy_files(".toml");
    assert!(!examples.is_empty(), "no example configs in deploy/");
    for example in &examples {
        let name = example
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("server") {
            check_server_example(example);
        } else if name.starts_with("agent") {
            check_agent_example(example);
        } else {
            panic!("{name}: no settings type known for this example; teach deploy_examples.rs");
        }
    }
}

/// The program an ExecStart= line runs, without systemd's prefixes (`-`, `@`, ...).
fn exec_start_program(unit_text: &str) -> Option<PathBuf> {
    let command = unit_text
        .lines()
        .find_map(|line| line.trim().strip_prefix("ExecStart="))?;
    let program = command.split_whitespace().next()?;
    Some(PathBuf::from(
        program.trim_start_matches(['-', '@', ':', '+', '!']),
    ))
}

/// The workspace binary of that name, if a package builds one.
fn workspace_binary_source(name: &str) -> Option<PathBuf> {
    ["server", "agent", "tests"]
        .iter()
        .map(|package| {
            workspace_root()
                .join(package)
                .join("src/bin")
                .join(format!("{name}.rs"))
        })
        .find(|source| source.exists())
}

#[test]
fn systemd_units_are_valid() {
    let units = deploy_files(".service");
    assert!(
        units.len() >= 2,
        "expected the server and agent units in deploy/"
    );
    let has_systemd_analyze = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    let scratch = flotte_tests::TempDir::new("flotte-deploy-units").expect("temp dir");
    for unit in &units {
        let text = std::fs::read_to_string(unit).expect("read unit");
        let program = exec_start_program(&text)
            .unwrap_or_else(|| panic!("{}: no ExecStart=", unit.display()));
        let binary_name = program
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        assert!(
            workspace_binary_source(&binary_name).is_some(),
            "{}: ExecStart runs {}, which this workspace does not build",
            unit.display(),
            program.display()
        );
        if !has_systemd_analyze {
            continue;
        }
        // `verify` refuses an ExecStart binary that is not installed, so the
        // copy it checks points at the binary this workspace just built.
        let built = flotte_tests::binary(&binary_name);
        let checked_copy = scratch
            .path()
            .join(unit.file_name().expect("unit file name"));
        // Only the ExecStart= line: its program is a bare name that also
        // appears elsewhere in the unit (StateDirectory=, Description=).
        std::fs::write(
            &checked_copy,
            text.replace(
                &format!("ExecStart={}", program.to_string_lossy()),
                &format!("ExecStart={}", built.to_string_lossy()),
            ),
        )
        .expect("write unit copy");
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&checked_copy)
            .output()
            .expect("run systemd-analyze");
        // `verify` exits 0 on unknown keys and unparsable values (it only
        // warns), so any line about this unit is a failure too; lines about
        // other units on the host are not this test's business.
        let unit_name = checked_copy
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let complaints: Vec<String> = String::from_utf8_lossy(&output.stderr)
            .lines()
            .chain(String::from_utf8_lossy(&output.stdout).lines())
            .filter(|line| line.contains(&unit_name))
            .map(str::to_owned)
            .collect();
        assert!(
            output.status.success() && complaints.is_empty(),
            "systemd-analyze verify {}: {}\n{}",
            unit.display(),
            output.status,
            complaints.join("\n")
        );
    }
}

/// Every sshd drop-in in `deploy/sshd/` passes `sshd -t` (the config test
/// mode) on top of a minimal config with its own host key. Without sshd it
/// fails, unless `FLOTTE_TEST_SKIP_SSHD=1` asks to skip (`.ci/run` installs it).
#[test]
fn sshd_drop_ins_pass_sshd_config_test() {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists()
        && flotte_tests::skip_for_missing_sshd(
            "/usr/sbin/sshd is missing (apt-get install openssh-server)",
            std::env::var(flotte_tests::SKIP_SSHD_VARIABLE)
                .ok()
                .as_deref(),
        )
    {
        return;
    }
    let directory = std::env::temp_dir().join(format!("flotte-sshd-t-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let host_key = directory.join("host_key");
    let _ = std::fs::remove_file(&host_key);
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .status()
        .unwrap();
    assert!(keygen.success());
    let mut drop_ins: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("sshd"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    drop_ins.sort();
    assert_eq!(
        drop_ins.len(),
        2,
        "file mode and command mode: {drop_ins:?}"
    );
    for drop_in in drop_ins {
        let text = std::fs::read_to_string(&drop_in).unwrap();
        let config = directory.join("sshd_config");
        std::fs::write(
            &config,
            format!("HostKey {}\nUsePAM no\n{text}", host_key.display()),
        )
        .unwrap();
        flotte_tests::assert_sshd_accepts(sshd, &config, &drop_in.display().to_string());
        assert!(text.contains("/etc/flotte/authorized_keys") || text.contains("authorized-keys"));
    }
    std::fs::remove_dir_all(&directory).unwrap();
}
