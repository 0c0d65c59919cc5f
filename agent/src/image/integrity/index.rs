//! The file index of an unpacked image and the comparison of a tree with
//! it. The index is made once, right after a verified payload was unpacked
//! into its private staging directory (so it describes the signed payload
//! and nothing else), and written atomically beside the tree as
//! `images/<digest>.index.json`. A verification walks the running tree the
//! same way and [`compare`]s.
//!
//! The walk never follows a symbolic link: every directory is opened with
//! `O_DIRECTORY | O_NOFOLLOW` relative to its parent's descriptor, every
//! entry is `lstat`ed (`fstatat` with `AT_SYMLINK_NOFOLLOW`), files are
//! opened with `O_NOFOLLOW | O_NONBLOCK` (a FIFO planted in the tree cannot
//! block the walk) and read only if the opened descriptor is a regular file.
//! It is blocking I/O: callers run it on the blocking pool.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use serde::{Deserialize, Serialize};

use super::rate::RateLimiter;

/// Index file format, written in every index.
pub const INDEX_FORMAT: u32 = 1;
/// Entries an image (or a tree being verified) may hold; beyond it the walk
/// stops with an error instead of growing without bound.
pub const MAX_INDEX_ENTRIES: usize = 1_000_000;
/// Directory depth the walk follows.
pub const MAX_TREE_DEPTH: usize = 256;
/// Differences kept in a verification result (the counts cover all).
pub const MAX_REPORTED_DIFFERENCES: usize = 100;
/// Bytes read from a file at a time.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// What a path is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntryKind {
    Directory,
    File {
        size: u64,
        sha256: String,
    },
    Symlink {
        target: String,
    },
    /// A FIFO, socket or device: never in an index (the unpacker refuses
    /// them), only found in a tree that drifted.
    Special,
}

impl EntryKind {
    fn name(&self) -> &'static str {
        match self {
            EntryKind::Directory => "directory",
            EntryKind::File { .. } => "file",
            EntryKind::Symlink { .. } => "symlink",
            EntryKind::Special => "special file",
        }
    }
}

/// One path of the tree, relative to the image root (`bin/app`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub path: String,
    /// Permission bits (`0o7777`); 0 for symlinks, whose mode means nothing.
    pub mode: u32,
    #[serde(flatten)]
    pub kind: EntryKind,
}

/// Every entry of an image tree, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIndex {
    pub format: u32,
    /// The manifest's mutable paths, left out of every comparison.
    #[serde(default)]
    pub mutable: Vec<String>,
    pub entries: Vec<IndexEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the image holds a file name that is not UTF-8 (`{prefix}`…); it cannot be indexed")]
    NameNotUtf8 { prefix: String },
    #[error("the tree holds more than {MAX_INDEX_ENTRIES} entries")]
    TooManyEntries,
    #[error("the tree is deeper than {MAX_TREE_DEPTH} directories at {path}")]
    TooDeep { path: String },
    #[error("index {path} is not valid: {reason}")]
    BadIndex { path: PathBuf, reason: String },
}

/// What to do with a name that is not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// Refuse it: an index must name every entry exactly.
    Strict,
    /// Keep it lossily (it matches no indexed path, so it shows as added).
    Lossy,
}

/// How a walk goes.
pub struct WalkOptions<'a> {
    pub names: Names,
    /// Paths (relative, no trailing `/`) whose subtrees are not read.
    pub skip: &'a [String],
    pub limiter: &'a mut RateLimiter,
}

/// What a walk read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalkTotals {
    pub bytes_read: u64,
}

fn io_at(path: &Path) -> impl FnOnce(nix::errno::Errno) -> IndexError + '_ {
    move |errno| IndexError::Io {
        path: path.to_owned(),
        source: std::io::Error::from(errno),
    }
}

/// Walks the tree under `root` (itself never a symlink) into an index.
pub fn walk_tree(
    root: &Path,
    options: &mut WalkOptions<'_>,
) -> Result<(ImageIndex, WalkTotals), IndexError> {
    let root_fd = openat(
        AT_FDCWD,
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_at(root))?;
    let mut walk = Walk {
        root,
        options,
        entries: Vec::new(),
        totals: WalkTotals::default(),
        buffer: vec![0; READ_CHUNK_BYTES],
    };
    walk.directory(&root_fd, "", 0)?;
    let mut entries = walk.entries;
    entries.sort_by(|left, right| left.path.cmp(&right.path));
    Ok((
        ImageIndex {
            format: INDEX_FORMAT,
            mutable: Vec::new(),
            entries,
        },
        walk.totals,
    ))
}

struct Walk<'w, 'a> {
    root: &'w Path,
    options: &'w mut WalkOptions<'a>,
    entries: Vec<IndexEntry>,
    totals: WalkTotals,
    buffer: Vec<u8>,
}

impl Walk<'_, '_> {
    fn name_of(&self, name: &OsStr) -> Result<String, IndexError> {
        match (name.to_str(), self.options.names) {
            (Some(name), _) => Ok(name.to_owned()),
            (None, Names::Lossy) => Ok(name.to_string_lossy().into_owned()),
            (None, Names::Strict) => Err(IndexError::NameNotUtf8 {
                prefix: name.to_string_lossy().chars().take(64).collect(),
            }),
        }
    }

    fn directory(
        &mut self,
        directory: &OwnedFd,
        prefix: &str,
        depth: usize,
    ) -> Result<(), IndexError> {
        if depth > MAX_TREE_DEPTH {
            return Err(IndexError::TooDeep {
                path: prefix.chars().take(256).collect(),
            });
        }
        let here = self.root.join(prefix);
        let listing = directory.try_clone().map_err(|source| IndexError::Io {
            path: here.clone(),
            source,
        })?;
        let mut names = Vec::new();
        let mut listing = Dir::from_fd(listing).map_err(io_at(&here))?;
        for item in listing.iter() {
            let item = item.map_err(io_at(&here))?;
            let name = OsStr::from_bytes(item.file_name().to_bytes()).to_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            let relative = self.name_of(&name)?;
            let path = if prefix.is_empty() {
                relative
            } else {
                format!("{prefix}/{relative}")
            };
            if self.entries.len() >= MAX_INDEX_ENTRIES {
                return Err(IndexError::TooManyEntries);
            }
            let full = self.root.join(&path);
            let stat = fstatat(directory, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(io_at(&full))?;
            let mode = stat.st_mode & 0o7777;
            let format = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
            let kind = if format == SFlag::S_IFDIR {
                EntryKind::Directory
            } else if format == SFlag::S_IFLNK {
                let target = readlinkat(directory, name.as_os_str()).map_err(io_at(&full))?;
                EntryKind::Symlink {
                    target: self.name_of(&target)?,
                }
            } else if format == SFlag::S_IFREG {
                self.file(directory, &name, &full)?
            } else {
                EntryKind::Special
            };
            let descend = kind == EntryKind::Directory && !is_under_any(&path, self.options.skip);
            self.entries.push(IndexEntry {
                path: path.clone(),
                mode: if matches!(kind, EntryKind::Symlink { .. }) {
                    0
                } else {
                    mode
                },
                kind,
            });
            if descend {
                let child = openat(
                    directory,
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_at(&full))?;
                self.directory(&child, &path, depth + 1)?;
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        directory: &OwnedFd,
        name: &OsStr,
        full: &Path,
    ) -> Result<EntryKind, IndexError> {
        let descriptor = openat(
            directory,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_at(full))?;
        // Replaced between the lstat and the open: what was opened is judged.
        let opened: FileStat = fstat(&descriptor).map_err(io_at(full))?;
        if SFlag::from_bits_truncate(opened.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Ok(EntryKind::Special);
        }
        let mut file = File::from(descriptor);
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut size = 0u64;
        loop {
            let read = file
                .read(&mut self.buffer)
                .map_err(|source| IndexError::Io {
                    path: full.to_owned(),
                    source,
                })?;
            if read == 0 {
                break;
            }
            self.options.limiter.take(read as u64);
            hasher.update(&self.buffer[..read]);
            size += read as u64;
        }
        self.totals.bytes_read += size;
        Ok(EntryKind::File {
            size,
            sha256: hex::encode(hasher.finish()),
        })
    }
}

/// Whether `path` is one of `prefixes` or below one.
pub fn is_under_any(path: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|prefix| {
        path == prefix
            || path
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// Writes `index` atomically at `path`.
pub fn write_index(path: &Path, index: &ImageIndex) -> Result<(), IndexError> {
    let bytes = serde_json::to_vec(index).map_err(|error| IndexError::BadIndex {
        path: path.to_owned(),
        reason: error.to_string(),
    })?;
    flotte_proto::files::write_atomically_with_mode(path, &bytes, 0o600).map_err(|source| {
        IndexError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

/// Reads an index written by [`write_index`].
pub fn read_index(path: &Path) -> Result<ImageIndex, IndexError> {
    let bytes = std::fs::read(path).map_err(|source| IndexError::Io {
        path: path.to_owned(),
        source,
    })?;
    let index: ImageIndex =
        serde_json::from_slice(&bytes).map_err(|error| IndexError::BadIndex {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    if index.format != INDEX_FORMAT {
        return Err(IndexError::BadIndex {
            path: path.to_owned(),
            reason: format!("format {} is not {INDEX_FORMAT}", index.format),
        });
    }
    Ok(index)
}

/// How a path differs from the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DifferenceKind {
    /// Content (size or SHA-256) differs, or the type of entry changed.
    Changed,
    Added,
    Removed,
    ModeChanged,
    LinkRetargeted,
}

impl DifferenceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DifferenceKind::Changed => "changed",
            DifferenceKind::Added => "added",
            DifferenceKind::Removed => "removed",
            DifferenceKind::ModeChanged => "mode",
            DifferenceKind::LinkRetargeted => "link",
        }
    }
}

/// One differing path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub path: String,
    pub kind: DifferenceKind,
    /// What was expected and what was found, short.
    pub detail: String,
}

/// The comparison of a tree with its index: counts of every difference and
/// the first [`MAX_REPORTED_DIFFERENCES`] of them in path order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    pub counts: BTreeMap<DifferenceKind, u64>,
    pub differences: Vec<Difference>,
}

impl Drift {
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn count(&self, kind: DifferenceKind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    fn push(&mut self, path: &str, kind: DifferenceKind, detail: String) {
        *self.counts.entry(kind).or_insert(0) += 1;
        if self.differences.len() < MAX_REPORTED_DIFFERENCES {
            self.differences.push(Difference {
                path: path.to_owned(),
                kind,
                detail,
            });
        }
    }
}

fn short(text: &str) -> String {
    text.chars().take(12).collect()
}

/// Compares `found` with `expected`; paths under `mutable` are left out on
/// both sides. Both must be sorted by path (as [`walk_tree`] makes them).
pub fn compare(expected: &ImageIndex, found: &ImageIndex, mutable: &[String]) -> Drift {
    let mut drift = Drift::default();
    let expected = expected
        .entries
        .iter()
        .filter(|entry| !is_under_any(&entry.path, mutable));
    let found = found
        .entries
        .iter()
        .filter(|entry| !is_under_any(&entry.path, mutable));
    let mut expected = expected.peekable();
    let mut found = found.peekable();
    loop {
        match (expected.peek(), found.peek()) {
            (None, None) => break,
            (Some(want), None) => {
                drift.push(
                    &want.path,
                    DifferenceKind::Removed,
                    want.kind.name().to_owned(),
                );
                expected.next();
            }
            (None, Some(have)) => {
                drift.push(
                    &have.path,
                    DifferenceKind::Added,
                    have.kind.name().to_owned(),
                );
                found.next();
            }
            (Some(want), Some(have)) => match want.path.cmp(&have.path) {
                std::cmp::Ordering::Less => {
                    drift.push(
                        &want.path,
                        DifferenceKind::Removed,
                        want.kind.name().to_owned(),
                    );
                    expected.next();
                }
                std::cmp::Ordering::Greater => {
                    drift.push(
                        &have.path,
                        DifferenceKind::Added,
                        have.kind.name().to_owned(),
                    );
                    found.next();
                }
                std::cmp::Ordering::Equal => {
                    compare_entry(want, have, &mut drift);
                    expected.next();
                    found.next();
                }
            },
        }
    }
    drift
}

fn compare_entry(want: &IndexEntry, have: &IndexEntry, drift: &mut Drift) {
    match (&want.kind, &have.kind) {
        (
            EntryKind::File { size, sha256 },
            EntryKind::File {
                size: found_size,
                sha256: found_sha256,
            },
        ) => {
            if size != found_size || sha256 != found_sha256 {
                drift.push(
                    &want.path,
                    DifferenceKind::Changed,
                    format!(
                        "sha256 {} ({size} bytes) → {} ({found_size} bytes)",
                        short(sha256),
                        short(found_sha256)
                    ),
                );
            }
        }
        (EntryKind::Symlink { target }, EntryKind::Symlink { target: found }) => {
            if target != found {
                drift.push(
                    &want.path,
                    DifferenceKind::LinkRetargeted,
                    format!("→ {} became → {}", bounded(target), bounded(found)),
                );
            }
        }
        (EntryKind::Directory, EntryKind::Directory) => {}
        (expected_kind, found_kind) => {
            drift.push(
                &want.path,
                DifferenceKind::Changed,
                format!("{} became a {}", expected_kind.name(), found_kind.name()),
            );
            return;
        }
    }
    if want.mode != have.mode {
        drift.push(
            &want.path,
            DifferenceKind::ModeChanged,
            format!("{:04o} → {:04o}", want.mode, have.mode),
        );
    }
}

fn bounded(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    struct Tree {
        root: PathBuf,
    }

    impl Tree {
        fn new() -> Self {
            let root = std::env::temp_dir().join(format!("flotte-index-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(root.join("bin")).unwrap();
            std::fs::create_dir_all(root.join("var/cache")).unwrap();
            std::fs::write(root.join("bin/app"), b"#!/bin/sh\necho app\n").unwrap();
            std::fs::set_permissions(root.join("bin/app"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            std::fs::write(root.join("config.toml"), b"answer = 42\n").unwrap();
            std::fs::write(root.join("var/cache/state"), b"first").unwrap();
            symlink("bin/app", root.join("app-link")).unwrap();
            Tree { root }
        }

        fn index(&self, names: Names) -> ImageIndex {
            let mut limiter = RateLimiter::unlimited();
            walk_tree(
                &self.root,
                &mut WalkOptions {
                    names,
                    skip: &[],
                    limiter: &mut limiter,
                },
            )
            .unwrap()
            .0
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn mutable() -> Vec<String> {
        vec!["var".to_owned()]
    }

    #[test]
    fn an_untouched_tree_matches_its_index() {
        let tree = Tree::new();
        let index = tree.index(Names::Strict);
        let paths: Vec<&str> = index.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "app-link",
                "bin",
                "bin/app",
                "config.toml",
                "var",
                "var/cache",
                "var/cache/state"
            ]
        );
        assert_eq!(
            compare(&index, &tree.index(Names::Lossy), &mutable()),
            Drift::default()
        );
    }

    #[test]
    fn each_kind_of_drift_is_found_and_named() {
        type Edit = fn(&Path);
        type Expected = Vec<(&'static str, DifferenceKind)>;
        let cases: Vec<(&str, Edit, Expected)> = vec![
            (
                "content edited in place",
                |root| std::fs::write(root.join("config.toml"), b"answer = 43\n").unwrap(),
                vec![("config.toml", DifferenceKind::Changed)],
            ),
            (
                "file added",
                |root| std::fs::write(root.join("bin/backdoor"), b"x").unwrap(),
                vec![("bin/backdoor", DifferenceKind::Added)],
            ),
            (
                "file removed",
                |root| std::fs::remove_file(root.join("config.toml")).unwrap(),
                vec![("config.toml", DifferenceKind::Removed)],
            ),
            (
                "mode changed",
                |root| {
                    std::fs::set_permissions(
                        root.join("bin/app"),
                        std::fs::Permissions::from_mode(0o4755),
                    )
                    .unwrap()
                },
                vec![("bin/app", DifferenceKind::ModeChanged)],
            ),
            (
                "symlink retargeted",
                |root| {
                    std::fs::remove_file(root.join("app-link")).unwrap();
                    symlink("/etc/shadow", root.join("app-link")).unwrap();
                },
                vec![("app-link", DifferenceKind::LinkRetargeted)],
            ),
            (
                "file replaced by a symlink",
                |root| {
                    std::fs::remove_file(root.join("config.toml")).unwrap();
                    symlink("bin/app", root.join("config.toml")).unwrap();
                },
                vec![("config.toml", DifferenceKind::Changed)],
            ),
            (
                "directory removed",
                |root| std::fs::remove_dir_all(root.join("bin")).unwrap(),
                vec![
                    ("bin", DifferenceKind::Removed),
                    ("bin/app", DifferenceKind::Removed),
                ],
            ),
            (
                "mutable path changed, added to and removed from",
                |root| {
                    std::fs::write(root.join("var/cache/state"), b"second").unwrap();
                    std::fs::write(root.join("var/new"), b"new").unwrap();
                    std::fs::remove_dir_all(root.join("var/cache")).unwrap();
                },
                vec![],
            ),
        ];
        for (name, edit, expected) in cases {
            let tree = Tree::new();
            let index = tree.index(Names::Strict);
            edit(&tree.root);
            let drift = compare(&index, &tree.index(Names::Lossy), &mutable());
            let found: Vec<(&str, DifferenceKind)> = drift
                .differences
                .iter()
                .map(|difference| (difference.path.as_str(), difference.kind))
                .collect();
            assert_eq!(found, expected, "{name}");
            assert_eq!(drift.total(), expected.len() as u64, "{name}");
        }
    }

    #[test]
    fn a_symlink_in_the_tree_is_never_followed() {
        let tree = Tree::new();
        let outside = std::env::temp_dir().join(format!("flotte-outside-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"outside the image").unwrap();
        symlink(&outside, tree.root.join("escape")).unwrap();
        let mut limiter = RateLimiter::unlimited();
        let (index, totals) = walk_tree(
            &tree.root,
            &mut WalkOptions {
                names: Names::Strict,
                skip: &[],
                limiter: &mut limiter,
            },
        )
        .unwrap();
        assert!(index
            .entries
            .iter()
            .all(|entry| !entry.path.starts_with("escape/")));
        let escape = index
            .entries
            .iter()
            .find(|entry| entry.path == "escape")
            .unwrap();
        assert!(
            matches!(&escape.kind, EntryKind::Symlink { target } if target == &outside.display().to_string())
        );
        let inside_bytes: u64 = index
            .entries
            .iter()
            .map(|entry| match entry.kind {
                EntryKind::File { size, .. } => size,
                _ => 0,
            })
            .sum();
        assert_eq!(totals.bytes_read, inside_bytes, "nothing outside was read");
        // A root that is itself a symlink is refused.
        let link_root = outside.with_extension("link");
        symlink(&tree.root, &link_root).unwrap();
        let refused = walk_tree(
            &link_root,
            &mut WalkOptions {
                names: Names::Strict,
                skip: &[],
                limiter: &mut limiter,
            },
        );
        assert!(matches!(refused, Err(IndexError::Io { .. })));
        std::fs::remove_file(link_root).unwrap();
        std::fs::remove_dir_all(outside).unwrap();
    }

    #[test]
    fn a_fifo_in_the_tree_is_reported_without_blocking() {
        let tree = Tree::new();
        let index = tree.index(Names::Strict);
        std::fs::remove_file(tree.root.join("config.toml")).unwrap();
        nix::unistd::mkfifo(
            &tree.root.join("config.toml"),
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let drift = compare(&index, &tree.index(Names::Lossy), &mutable());
        assert_eq!(drift.count(DifferenceKind::Changed), 1);
        assert!(
            drift.differences[0].detail.contains("special file"),
            "{:?}",
            drift
        );
    }

    #[test]
    fn differences_beyond_the_bound_are_counted_not_listed() {
        let tree = Tree::new();
        let index = tree.index(Names::Strict);
        for number in 0..(MAX_REPORTED_DIFFERENCES + 20) {
            std::fs::write(tree.root.join(format!("bin/extra-{number:04}")), b"x").unwrap();
        }
        let drift = compare(&index, &tree.index(Names::Lossy), &mutable());
        assert_eq!(drift.differences.len(), MAX_REPORTED_DIFFERENCES);
        assert_eq!(
            drift.count(DifferenceKind::Added),
            (MAX_REPORTED_DIFFERENCES + 20) as u64
        );
    }

    #[test]
    fn a_non_utf8_name_is_refused_in_an_index_and_shown_when_verifying() {
        let tree = Tree::new();
        let index = tree.index(Names::Strict);
        std::fs::write(tree.root.join(OsStr::from_bytes(b"bad-\xff")), b"x").unwrap();
        let mut limiter = RateLimiter::unlimited();
        let refused = walk_tree(
            &tree.root,
            &mut WalkOptions {
                names: Names::Strict,
                skip: &[],
                limiter: &mut limiter,
            },
        );
        assert!(matches!(refused, Err(IndexError::NameNotUtf8 { .. })));
        let drift = compare(&index, &tree.index(Names::Lossy), &mutable());
        assert_eq!(drift.count(DifferenceKind::Added), 1);
    }

    #[test]
    fn an_index_round_trips_through_its_file() {
        let tree = Tree::new();
        let index = tree.index(Names::Strict);
        let path = tree.root.with_extension("index.json");
        write_index(&path, &index).unwrap();
        assert_eq!(read_index(&path).unwrap(), index);
        std::fs::write(&path, b"{\"format\":2,\"entries\":[]}").unwrap();
        assert!(matches!(
            read_index(&path),
            Err(IndexError::BadIndex { .. })
        ));
        std::fs::remove_file(path).unwrap();
    }
}
