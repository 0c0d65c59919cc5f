//! Safe unpacking of an image payload (`payload.tar.zst`, a zstd-compressed
//! tar of a directory tree) into a fresh `images/<digest>/` directory, plus
//! [`sync_tree`] for the caller to make that tree durable before it switches
//! the `current` symlink. This file is a security boundary: the payload is
//! treated as hostile. What must never happen here: a write outside
//! `destination` (through an absolute path, `..`, a symlink or a hard link),
//! a device node or FIFO, a setuid/setgid bit the agent config did not allow,
//! ownership taken from the archive, unbounded disk or memory spent on one
//! payload, a partial unpack left behind, or anything that already existed
//! (the running image above all) being modified or removed.
//!
//! Decisions, so the callers and image builders know what is accepted:
//! - Entry paths are relative; `.` components and repeated or trailing `/`
//!   are normalized away (tar writers commonly emit `./bin/x` and `dir/`),
//!   while `..`, a leading `/`, NUL bytes and empty names are refused. An
//!   entry naming the root itself (`./`) is accepted for directories and
//!   ignored: the root keeps mode 0755.
//! - Symlinks: absolute targets are refused (at run time they would resolve
//!   against the machine's root, not the image). Relative targets may start
//!   with `..` components, as many as the link is deep below the image root,
//!   and then only named components: a `..` after a name is refused because
//!   that name could itself be another symlink of the archive (`l1 -> ..`,
//!   `d/e/l2 -> ../l1/..`), which defeats any lexical check. With that rule
//!   every link resolves inside the root whatever the other links are, since
//!   every directory is a real directory created here.
//! - No entry is ever written through a symlink, even one pointing inside the
//!   image: every existing parent of an entry must be a real directory.
//! - Hard links must point (tar-style, relative to the image root) to a
//!   regular file that an earlier entry unpacked. They count as `files`.
//! - Entries never replace each other: a second entry for an existing path is
//!   refused (files are created with `O_CREAT | O_EXCL`), except a directory
//!   entry for an existing directory, which only updates its mode.
//! - Permission bits are kept; directories get owner `rwx` while unpacking
//!   and their exact mode (e.g. 0555) at the end, deepest first. Ownership
//!   and modification times from the archive are not applied.
//! - Size: the declared data sizes of all entries count towards
//!   `max_total_bytes`, checked before anything of the entry is written; the
//!   bytes actually copied must equal the declared size. Archive metadata
//!   (headers, PAX records, GNU long names, padding) is bounded separately
//!   ([`MAX_METADATA_BYTES_PER_ENTRY`], [`MAX_METADATA_BYTES_TOTAL`]) because
//!   the tar reader buffers long names and PAX records in memory.
//! - An archive must end with the tar end-of-archive block, so a payload cut
//!   at an entry boundary is refused as truncated rather than unpacked short.
//! - GNU sparse files, devices, FIFOs and unknown entry types are refused.
//!
//! Where each part lives: `rules` holds the pure decisions (entry types,
//! path normalisation, symlink targets, setuid; no I/O, the part worth
//! fuzzing), `budget` the bounds on metadata and declared sizes, `writer`
//! the creation of the tree (parents, exclusive creation, links, modes,
//! removal of a refused tree), `durability` the fsync of a finished tree.
//!
//! Threat model: the archive is hostile; the file system under `images/` is
//! written only by the agent. The checks use paths (lstat, then create with
//! `O_EXCL`), so they are not meant to resist another local process racing
//! inside the fresh directory.

mod budget;
mod durability;
pub mod rules;
#[cfg(test)]
mod test_archives;
mod writer;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

pub use budget::{MAX_METADATA_BYTES_PER_ENTRY, MAX_METADATA_BYTES_TOTAL};
pub use durability::sync_tree;
pub use writer::remove_unpacked_tree;

/// What the agent config allows an image to contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackPolicy {
    /// Refuse archives whose entries add up to more than this many bytes.
    pub max_total_bytes: u64,
    /// Whether setuid/setgid bits may be kept (they are refused otherwise).
    pub allow_setuid: bool,
}

/// What was unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackSummary {
    /// Regular files and hard links.
    pub files: u64,
    /// Directories created, whether listed in the archive or implied by a
    /// deeper entry; the image root itself is not counted.
    pub directories: u64,
    pub symlinks: u64,
    /// Bytes of regular-file data written.
    pub total_bytes: u64,
}

/// Why a payload was refused. Every variant names the archive entry at fault
/// (as written in the archive) or, for I/O, the path on disk.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("image directory {path} already exists; refusing to unpack over it")]
    DestinationExists { path: PathBuf },
    #[error("archive entry `{entry}` has an unsafe path: {reason}")]
    UnsafePath { entry: PathBuf, reason: String },
    #[error("archive entry `{entry}` is a symlink to `{target}`, which is refused: {reason}")]
    SymlinkEscape {
        entry: PathBuf,
        target: PathBuf,
        reason: String,
    },
    #[error("archive entry `{entry}` is a hard link to `{target}`, which is refused: {reason}")]
    HardlinkEscape {
        entry: PathBuf,
        target: PathBuf,
        reason: String,
    },
    #[error("archive entry `{entry}` is a {kind}, which images may not contain")]
    ForbiddenType { entry: PathBuf, kind: String },
    #[error(
        "archive entry `{entry}` has mode {mode:o} with setuid/setgid bits, \
         which the agent config does not allow"
    )]
    Setuid { entry: PathBuf, mode: u32 },
    #[error("archive entry `{entry}` takes the image over its size limit of {limit} bytes")]
    TooLarge { entry: PathBuf, limit: u64 },
    #[error(
        "archive metadata (headers, long names, PAX records) {} exceeds its limit of {limit} bytes",
        describe_position(.near_entry)
    )]
    MetadataTooLarge {
        near_entry: Option<PathBuf>,
        limit: u64,
    },
    #[error(
        "payload archive is truncated or corrupt {}: {source}",
        describe_position(.near_entry)
    )]
    Corrupt {
        /// The entry being read, or the last one read before the failure.
        near_entry: Option<PathBuf>,
        source: io::Error,
    },
    #[error("cannot unpack at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn describe_position(near_entry: &Option<PathBuf>) -> String {
    match near_entry {
        Some(entry) => format!("at or after entry `{}`", entry.display()),
        None => "at the start of the archive".to_owned(),
    }
}

/// Unpacks `archive` (a zstd-compressed tar) into `destination`, which must
/// not exist yet; its parent is created if missing. The archive is streamed,
/// never loaded in memory. On any error the partial `destination` is removed
/// (without following symlinks) and nothing else is touched; if
/// `destination` already exists it is left alone. Nothing is fsynced: call
/// [`sync_tree`] before committing the image.
pub fn unpack_payload(
    archive: &Path,
    destination: &Path,
    policy: &UnpackPolicy,
) -> Result<UnpackSummary, UnpackError> {
    // Opened first so that a missing payload leaves no empty directory.
    let archive_file = File::open(archive).map_err(io_error_at(archive))?;
    writer::create_image_root(destination)?;
    match writer::unpack_into_fresh_root(archive, archive_file, destination, policy) {
        Ok(summary) => {
            tracing::debug!(
                archive = %archive.display(),
                destination = %destination.display(),
                ?summary,
                "image payload unpacked"
            );
            Ok(summary)
        }
        Err(error) => {
            writer::remove_partial_image(destination);
            Err(error)
        }
    }
}

fn io_error_at(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::test_archives::*;
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use tar::EntryType;

    #[test]
    fn unpacks_a_well_formed_image() {
        let scratch = Scratch::new();
        let long_name = format!("deep/{}", "x".repeat(120));
        let tool_script = b"#!/bin/sh\necho hi\n";
        let archive = TestArchive::new()
            .directory("./", 0o755)
            .directory("./bin/", 0o755)
            .file("./bin/tool", 0o755, tool_script)
            .file("etc/config.toml", 0o640, b"answer = 42\n")
            .directory("ro/", 0o555)
            .file("ro/readme", 0o444, b"read me")
            .symlink("bin/tool-link", "tool")
            .symlink("etc/tool", "../bin/tool")
            .hard_link("bin/tool-hard", "./bin/tool")
            .gnu_long_name(long_name.as_bytes())
            .file("deep/truncated-name", 0o644, b"long")
            .pax_path(b"pax/named-by-pax")
            .file("ignored-name", 0o600, b"pax")
            .entry(
                b"pax_global_header",
                EntryType::XGlobalHeader,
                0o644,
                None,
                &pax_record("comment", b"global"),
            )
            .file("empty", 0o600, b"");
        fs::write(scratch.archive_path(), archive.compressed()).unwrap();

        let summary = unpack_payload(
            &scratch.archive_path(),
            &scratch.destination(),
            &default_policy(),
        )
        .unwrap();

        let root = scratch.destination();
        assert_eq!(
            summary,
            UnpackSummary {
                files: 7,
                directories: 5,
                symlinks: 2,
                total_bytes: (tool_script.len() + 12 + 7 + 4 + 3) as u64,
            }
        );
        assert_eq!(mode_of(&root), 0o755);
        assert_eq!(fs::read(root.join("bin/tool")).unwrap(), tool_script);
        assert_eq!(mode_of(&root.join("bin/tool")), 0o755, "exec bits kept");
        assert_eq!(mode_of(&root.join("etc")), 0o755, "implied parent");
        assert_eq!(mode_of(&root.join("etc/config.toml")), 0o640);
        assert_eq!(
            mode_of(&root.join("ro")),
            0o555,
            "read-only dir applied last"
        );
        assert_eq!(fs::read(root.join("ro/readme")).unwrap(), b"read me");
        assert_eq!(mode_of(&root.join("ro/readme")), 0o444);
        assert_eq!(
            fs::read_link(root.join("bin/tool-link")).unwrap(),
            Path::new("tool")
        );
        assert_eq!(fs::read(root.join("etc/tool")).unwrap(), tool_script);
        let hard_link = fs::symlink_metadata(root.join("bin/tool-hard")).unwrap();
        let original = fs::symlink_metadata(root.join("bin/tool")).unwrap();
        assert_eq!(hard_link.ino(), original.ino());
        assert_eq!(fs::read(root.join(&long_name)).unwrap(), b"long");
        assert_eq!(fs::read(root.join("pax/named-by-pax")).unwrap(), b"pax");
        assert!(!root.join("ignored-name").exists());
        assert!(!root.join("deep/truncated-name").exists());
        assert!(!root.join("pax_global_header").exists());
        assert_eq!(fs::read(root.join("empty")).unwrap(), b"");
        // Ownership from the archive (4242) is never applied.
        assert_ne!(original.uid(), 4242);

        sync_tree(&root).unwrap();
    }

    #[test]
    fn a_missing_payload_creates_nothing() {
        let scratch = Scratch::new();
        let error = unpack_payload(
            &scratch.archive_path(),
            &scratch.destination(),
            &default_policy(),
        )
        .unwrap_err();
        assert!(matches!(&error, UnpackError::Io { path, .. } if path == &scratch.archive_path()));
        assert!(fs::symlink_metadata(scratch.destination()).is_err());
    }

    #[test]
    fn leaves_an_existing_destination_alone() {
        let scratch = Scratch::new();
        fs::create_dir_all(scratch.destination()).unwrap();
        fs::write(scratch.destination().join("running"), b"current image").unwrap();
        fs::write(
            scratch.archive_path(),
            TestArchive::new()
                .file("running", 0o644, b"new")
                .compressed(),
        )
        .unwrap();
        let error = unpack_payload(
            &scratch.archive_path(),
            &scratch.destination(),
            &default_policy(),
        )
        .unwrap_err();
        assert!(matches!(error, UnpackError::DestinationExists { .. }));
        assert_eq!(
            fs::read(scratch.destination().join("running")).unwrap(),
            b"current image"
        );
    }

    #[test]
    fn refuses_a_truncated_zstd_stream() {
        let compressed = TestArchive::new()
            .file("a", 0o644, &[3; 20_000])
            .file("b", 0o644, b"b")
            .compressed();
        let error = assert_refused_bytes(&compressed[..compressed.len() / 2], &default_policy());
        assert!(matches!(&error, UnpackError::Corrupt { .. }), "{error}");
    }

    #[test]
    fn refuses_garbage_and_empty_payloads() {
        let garbage: Vec<u8> = (0..4096u32).map(|index| (index * 31 % 251) as u8).collect();
        let error = assert_refused_bytes(&garbage, &default_policy());
        assert!(
            matches!(
                &error,
                UnpackError::Corrupt {
                    near_entry: None,
                    ..
                }
            ),
            "{error}"
        );

        let error = assert_refused_bytes(b"", &default_policy());
        assert!(matches!(&error, UnpackError::Corrupt { .. }), "{error}");

        // A valid zstd frame around something that is not a tar.
        let not_tar = zstd::encode_all(&[0x55u8; 2048][..], 3).unwrap();
        let error = assert_refused_bytes(&not_tar, &default_policy());
        assert!(matches!(&error, UnpackError::Corrupt { .. }), "{error}");
    }
}
