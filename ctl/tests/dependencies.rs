//! flottectl never links the server: an operator who wants the CLI must not
//! build the server, its SQLite included. Checked on the resolved dependency
//! tree (`cargo tree`), so a dependency pulled in indirectly (through
//! flotte-common, say) fails this test as well as a direct one.

// Test code: a failed setup step must stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// The names of every package in the normal and build dependency tree of
/// `package` (dev-dependencies left out: they never reach an operator).
fn dependency_names(package: &str) -> Vec<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--package",
            package,
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_cli_and_its_shared_crate_link_neither_the_server_nor_sqlite() {
    for package in ["flottectl", "flotte-common"] {
        let names = dependency_names(package);
        // The tree is the real one: it holds what the package does depend on.
        assert!(names.iter().any(|name| name == "flotte-proto"), "{names:?}");
        for forbidden in ["flotte-server", "rusqlite", "libsqlite3-sys"] {
            assert!(
                !names.iter().any(|name| name == forbidden),
                "{package} depends on {forbidden}: {names:?}"
            );
        }
    }
}
