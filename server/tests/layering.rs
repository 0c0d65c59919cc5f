//! The server's layers point one way: edge → services → live → domain →
//! store (ARCHITECTURE.md, "Layers"). This test reads every source file of
//! the server and fails, naming the file and line, when an import points the
//! wrong way or when the wire (tonic, the generated `v1` module) is used
//! outside the edge.
//!
//! It reads code, not comments: a doc comment may name a forbidden module to
//! explain why it is forbidden.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// One rule: files under `layer` (a folder of `server/src`, or "" for every
/// file) must not contain any of `forbidden` in their code, except files
/// under `except`.
struct Rule {
    layer: &'static str,
    except: &'static [&'static str],
    forbidden: &'static [&'static str],
    why: &'static str,
}

const RULES: &[Rule] = &[
    Rule {
        layer: "",
        except: &["edge/"],
        forbidden: &["tonic", "flotte_proto::v1"],
        why: "only the edge speaks the wire: convert to domain types there",
    },
    Rule {
        layer: "",
        except: &["edge/", "lib.rs"],
        forbidden: &["crate::edge"],
        why: "nothing calls up into the edge (lib.rs only wires it)",
    },
    Rule {
        layer: "live/",
        except: &[],
        forbidden: &["crate::services"],
        why: "live state and loops sit below the services that use them",
    },
    Rule {
        layer: "domain/",
        except: &[],
        forbidden: &[
            "crate::services",
            "crate::live",
            "tokio::",
            "std::fs",
            "std::net",
            "rusqlite",
            "SystemTime::now",
        ],
        why: "the domain is pure: decisions over their arguments, no I/O",
    },
    Rule {
        layer: "store/",
        except: &[],
        forbidden: &["crate::services", "crate::live"],
        why: "the store knows domain types only",
    },
];

fn source_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

/// The code of a line, without a trailing `//` comment; `None` for a line
/// that is only a comment.
fn code_of(line: &str) -> Option<&str> {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") {
        return None;
    }
    Some(line.split(" //").next().unwrap_or(line))
}

fn violations(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    source_files(root, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in &files {
        let relative = file
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(file).unwrap();
        for rule in RULES {
            if !relative.starts_with(rule.layer)
                || rule
                    .except
                    .iter()
                    .any(|except| relative.starts_with(except))
            {
                continue;
            }
            for (number, line) in text.lines().enumerate() {
                let Some(code) = code_of(line) else { continue };
                for forbidden in rule.forbidden {
                    if code.contains(forbidden) {
                        found.push(format!(
                            "server/src/{relative}:{}: uses `{forbidden}` ({})",
                            number + 1,
                            rule.why
                        ));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn imports_point_one_way_and_the_wire_stays_in_the_edge() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&root);
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

#[test]
fn the_check_finds_a_planted_violation() {
    // The rules must be able to fail: a domain file that reads the clock and
    // a live file that uses tonic are both reported.
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("layering-planted");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("domain")).unwrap();
    std::fs::create_dir_all(scratch.join("live")).unwrap();
    std::fs::write(
        scratch.join("domain/rules.rs"),
        "// tokio:: in a comment is fine\nfn now() { let _ = tokio::time::Instant::now(); }\n",
    )
    .unwrap();
    std::fs::write(
        scratch.join("live/loop.rs"),
        "use tonic::Status;\nuse crate::services::machines;\n",
    )
    .unwrap();
    let found = violations(&scratch);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found[0].contains("domain/rules.rs:2") && found[0].contains("tokio::"));
    assert!(found[1].contains("live/loop.rs:1") && found[1].contains("tonic"));
    assert!(found[2].contains("live/loop.rs:2") && found[2].contains("crate::services"));
    std::fs::remove_dir_all(&scratch).unwrap();
}
