//! The `flotte-server` command line as an operator meets it: `init` refuses to
//! replace an existing CA, and `run` with a bad settings file exits with
//! status 2 listing every problem at once (not just the first); the binary
//! allocates with jemalloc and its built-in settings, which the operator's
//! `MALLOC_CONF` overrides.

// Test code: a failed setup step must stop the test with its message, helpers
// included (clippy exempts only the #[test] functions themselves).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// A fresh scratch directory for one test under cargo's per-target temp dir
/// (left in place after a failure, for inspection; replaced on the next run).
fn scratch_dir(test_name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("flotte-server-cli-{test_name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn flotte_server(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotte-server"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn init(data_dir: &std::path::Path) -> Output {
    flotte_server(&["init".as_ref(), "--data-dir".as_ref(), data_dir.as_os_str()])
}

#[test]
fn init_twice_refuses_to_replace_the_existing_ca() {
    let scratch = scratch_dir("init-twice");
    let data_dir = scratch.join("server");
    let first = init(&data_dir);
    assert!(
        first.status.success(),
        "first init: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    let ca_before = std::fs::read(data_dir.join("ca/ca.pem")).unwrap();

    let second = init(&data_dir);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "second init succeeded: {stderr}");
    assert!(
        stderr.contains("CA already exists") && stderr.contains("ca.pem"),
        "the refusal should name the existing CA: {stderr}"
    );
    assert_eq!(
        std::fs::read(data_dir.join("ca/ca.pem")).unwrap(),
        ca_before,
        "the CA was replaced"
    );
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn run_with_a_bad_config_exits_2_listing_every_problem() {
    let scratch = scratch_dir("bad-config");
    let config = scratch.join("bad.toml");
    std::fs::write(
        &config,
        r#"
listen = "nowhere"
trust_domain = "bad/domain"
subject_alt_names = ["bad name"]
machine_certificate_ttl = "soon"
report_interval = "0s"
last_seen_flush_interval = "often"
"#,
    )
    .unwrap();
    let output = flotte_server(&[
        "run".as_ref(),
        "--data-dir".as_ref(),
        scratch.join("server").as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for expected in [
        "listen = \"nowhere\"",
        "trust_domain = \"bad/domain\"",
        "subject_alt_names: \"bad name\"",
        "machine_certificate_ttl = \"soon\"",
        "report_interval = \"0s\" is too short",
        "last_seen_flush_interval = \"often\"",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected:?} missing from:\n{stderr}"
        );
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn run_with_an_unknown_key_exits_2_naming_it() {
    let scratch = scratch_dir("unknown-key");
    let config = scratch.join("typo.toml");
    std::fs::write(&config, "listn = \"127.0.0.1:0\"\n").unwrap();
    let output = flotte_server(&[
        "run".as_ref(),
        "--data-dir".as_ref(),
        scratch.join("server").as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("listn") && stderr.contains("typo.toml"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// The jemalloc options `flotte-server` runs with, as jemalloc itself prints
/// them at exit (`stats_print`), given `operator_settings` in MALLOC_CONF.
fn jemalloc_options_at_exit(operator_settings: &str) -> String {
    // `--version` exits at once; jemalloc prints its statistics then. Only
    // the general section (the options) is asked for.
    let output = Command::new(env!("CARGO_BIN_EXE_flotte-server"))
        .arg("--version")
        .env(
            "MALLOC_CONF",
            format!("{operator_settings}stats_print:true,stats_print_opts:mdablxe"),
        )
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Whether jemalloc printed `expected` ("opt.NAME: VALUE") as one of its
/// lines, which may go on with the source of the value in parentheses.
fn has_option(options: &str, expected: &str) -> bool {
    options.lines().any(|line| {
        let line = line.trim();
        line == expected || line.starts_with(&format!("{expected} ("))
    })
}

#[test]
fn the_server_allocates_with_jemalloc_and_its_built_in_settings() {
    // Were the C library's malloc in use, MALLOC_CONF would mean nothing and
    // nothing would be printed.
    let options = jemalloc_options_at_exit("");
    for expected in [
        "opt.narenas: 2",
        "opt.background_thread: true",
        "opt.dirty_decay_ms: 1000",
        "opt.muzzy_decay_ms: 0",
    ] {
        assert!(
            has_option(&options, expected),
            "{expected:?} not among jemalloc's options:\n{options}"
        );
    }
}

#[test]
fn the_operators_malloc_conf_overrides_one_built_in_setting_and_keeps_the_rest() {
    let options = jemalloc_options_at_exit("narenas:4,");
    for expected in ["opt.narenas: 4", "opt.dirty_decay_ms: 1000"] {
        assert!(
            has_option(&options, expected),
            "{expected:?} not among jemalloc's options:\n{options}"
        );
    }
}

#[test]
fn the_running_server_makes_an_arena_that_returns_freed_pages_at_once() {
    // `run` sets the arena up first thing, then finds a bad setting and
    // exits; jemalloc prints each arena's statistics at exit.
    let scratch = scratch_dir("fresh-page-arena");
    let config = scratch.join("bad.toml");
    std::fs::write(&config, "listen = \"nowhere\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_flotte-server"))
        .args(["run", "--data-dir"])
        .arg(scratch.join("server"))
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .env("MALLOC_CONF", "stats_print:true,stats_print_opts:gmdblxeh")
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(2), "{printed}");
    let arena: usize = printed
        .split("fresh_page_arena=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|index| index.parse().ok())
        .unwrap_or_else(|| panic!("the start log names no fresh-page arena:\n{printed}"));
    // jemalloc's own words for that arena: its decay times, in ms.
    let section = printed
        .split(&format!("arenas[{arena}]:"))
        .nth(1)
        .unwrap_or_else(|| panic!("jemalloc printed no arena {arena}:\n{printed}"));
    let decay_time = |kind: &str| {
        section
            .lines()
            .find_map(|line| line.trim().strip_prefix(kind))
            .and_then(|figures| figures.split_whitespace().next())
            .map(str::to_owned)
    };
    assert_eq!(decay_time("dirty:").as_deref(), Some("0"), "{section}");
    assert_eq!(decay_time("muzzy:").as_deref(), Some("0"), "{section}");
    std::fs::remove_dir_all(&scratch).unwrap();
}
