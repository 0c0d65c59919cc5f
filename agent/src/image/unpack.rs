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
//! Threat model: the archive is hostile; the file system under `images/` is
//! written only by the agent. The checks use paths (lstat, then create with
//! `O_EXCL`), so they are not meant to resist another local process racing
//! inside the fresh directory.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Mode of the image root and of parent directories the archive implies
/// without listing them.
const UNPACKED_DIRECTORY_MODE: u32 = 0o755;

/// Owner read/write/search: kept on every directory while unpacking so that
/// a read-only directory of the archive can still receive its children.
const OWNER_READ_WRITE_SEARCH: u32 = 0o700;

/// Mode of a regular file while its data is written; the archive's mode is
/// applied once the data is complete (writing would clear setuid anyway).
const MODE_WHILE_WRITING_FILE: u32 = 0o600;

const PERMISSION_BITS: u32 = 0o7777;
const SETUID_SETGID_BITS: u32 = 0o6000;

/// A tar header, and the end-of-archive marker, is one 512-byte block.
const TAR_BLOCK_BYTES: u64 = 512;

/// Most metadata read while looking for the next entry: its header, GNU long
/// name/link, PAX records and the previous entry's padding. Real names are a
/// few KiB at most; the bound keeps a hostile long name (buffered whole by
/// the tar reader) from exhausting memory.
pub const MAX_METADATA_BYTES_PER_ENTRY: u64 = 1024 * 1024;

/// Most metadata in one archive. Every entry costs at least one 512-byte
/// header, so this also bounds the number of entries (about a million), and
/// with it inodes and time spent on an archive of empty files.
pub const MAX_METADATA_BYTES_TOTAL: u64 = 512 * 1024 * 1024;

const COPY_BUFFER_BYTES: usize = 64 * 1024;

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
    create_image_root(destination)?;
    match unpack_into_fresh_root(archive, archive_file, destination, policy) {
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
            remove_partial_image(destination);
            Err(error)
        }
    }
}

/// Fsyncs every regular file and directory under `root` (and `root`
/// itself), without following symlinks, so that an unpacked image is durable
/// before the caller points `current` at it. Syncing the directory that
/// holds `root` remains the caller's job. Where an entry cannot be opened
/// (its mode denies the agent), the whole file system of `root` is synced
/// instead. Errors name the path they happened at.
pub fn sync_tree(root: &Path) -> io::Result<()> {
    let mut pending_paths = vec![root.to_path_buf()];
    let mut needs_file_system_sync = false;
    while let Some(path) = pending_paths.pop() {
        let file_type = fs::symlink_metadata(&path)
            .map_err(io_error_naming(&path))?
            .file_type();
        if file_type.is_dir() {
            match fs::read_dir(&path) {
                Ok(children) => {
                    for child in children {
                        pending_paths.push(child.map_err(io_error_naming(&path))?.path());
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                    needs_file_system_sync = true;
                }
                Err(error) => return Err(io_error_naming(&path)(error)),
            }
        }
        // Symlinks have no data of their own: their directory entry is made
        // durable by the fsync of the directory holding them.
        if file_type.is_dir() || file_type.is_file() {
            match File::open(&path) {
                Ok(handle) => handle.sync_all().map_err(io_error_naming(&path))?,
                Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                    needs_file_system_sync = true;
                }
                Err(error) => return Err(io_error_naming(&path)(error)),
            }
        }
    }
    if needs_file_system_sync {
        sync_file_system_of(root).map_err(io_error_naming(root))?;
    }
    Ok(())
}

/// Removes an unpacked (or partially unpacked) image tree without following
/// symlinks. Unlike a bare `remove_dir_all`, it first makes every directory
/// owner-writable, so that read-only directories of the image (mode 0555)
/// do not make the removal fail for an unprivileged agent.
pub fn remove_unpacked_tree(root: &Path) -> io::Result<()> {
    let mut pending_directories = vec![root.to_path_buf()];
    while let Some(directory) = pending_directories.pop() {
        let Ok(metadata) = fs::symlink_metadata(&directory) else {
            continue;
        };
        if !metadata.is_dir() {
            continue;
        }
        let mode = metadata.permissions().mode();
        if mode & OWNER_READ_WRITE_SEARCH != OWNER_READ_WRITE_SEARCH {
            let writable_mode = (mode & PERMISSION_BITS) | OWNER_READ_WRITE_SEARCH;
            // A failure here shows up as the removal's own error below.
            let _ = fs::set_permissions(&directory, Permissions::from_mode(writable_mode));
        }
        let Ok(children) = fs::read_dir(&directory) else {
            continue;
        };
        for child in children.flatten() {
            if child.file_type().is_ok_and(|file_type| file_type.is_dir()) {
                pending_directories.push(child.path());
            }
        }
    }
    fs::remove_dir_all(root)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn sync_file_system_of(root: &Path) -> io::Result<()> {
    let root_handle = File::open(root)?;
    nix::unistd::syncfs(&root_handle).map_err(io::Error::from)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn sync_file_system_of(_root: &Path) -> io::Result<()> {
    // No per-file-system sync here: flush everything.
    nix::unistd::sync();
    Ok(())
}

/// Keeps the path in an I/O error that is returned as a plain `io::Error`.
fn io_error_naming(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |error| io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

fn io_error_at(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `destination` atomically: `create_dir` fails if anything (even a
/// dangling symlink) is already there, so an existing image is never reused.
fn create_image_root(destination: &Path) -> Result<(), UnpackError> {
    if let Some(parent) = destination
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        fs::create_dir_all(parent).map_err(io_error_at(parent))?;
    }
    match create_directory_with_mode(destination, UNPACKED_DIRECTORY_MODE) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            Err(UnpackError::DestinationExists {
                path: destination.to_path_buf(),
            })
        }
        Err(error) => Err(io_error_at(destination)(error)),
    }
}

/// Creates one directory with exactly `mode` (the explicit chmod undoes the
/// umask). Fails if the path exists.
fn create_directory_with_mode(path: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().mode(mode).create(path)?;
    fs::set_permissions(path, Permissions::from_mode(mode))
}

/// Best-effort removal of a partial image after a refusal: the refusal is
/// what the caller needs to see, so a failed cleanup is only logged.
fn remove_partial_image(image_root: &Path) {
    if let Err(error) = remove_unpacked_tree(image_root) {
        tracing::warn!(
            path = %image_root.display(),
            %error,
            "could not remove a partially unpacked image"
        );
    }
}

fn unpack_into_fresh_root(
    archive_path: &Path,
    archive_file: File,
    image_root: &Path,
    policy: &UnpackPolicy,
) -> Result<UnpackSummary, UnpackError> {
    let decompressed = zstd::stream::read::Decoder::with_buffer(BufReader::new(archive_file))
        .map_err(io_error_at(archive_path))?;
    let stream_budget = Rc::new(StreamBudget::default());
    let mut archive = tar::Archive::new(BudgetedReader {
        inner: decompressed,
        budget: Rc::clone(&stream_budget),
    });
    let mut unpacker = ImageUnpacker {
        image_root: image_root.to_path_buf(),
        policy,
        summary: UnpackSummary {
            files: 0,
            directories: 0,
            symlinks: 0,
            total_bytes: 0,
        },
        declared_bytes: 0,
        restrictive_directory_modes: HashMap::new(),
        copy_buffer: vec![0; COPY_BUFFER_BYTES],
        stream_budget,
        last_entry: None,
    };
    unpacker.unpack_all_entries(&mut archive)?;
    unpacker.apply_restrictive_directory_modes()?;
    Ok(unpacker.summary)
}

/// Which part of the tar stream is being read: metadata is bounded by the
/// budget, entry data by the declared sizes already checked against the
/// policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamPhase {
    Headers,
    EntryData,
}

/// Shared between the unpacker (which sets the phase around each call into
/// the tar reader) and the reader under the tar reader (which counts).
#[derive(Debug)]
struct StreamBudget {
    phase: Cell<StreamPhase>,
    metadata_bytes_for_next_entry: Cell<u64>,
    metadata_bytes_total: Cell<u64>,
    /// Set to the limit that was hit, so the resulting I/O error from inside
    /// the tar reader can be reported as `MetadataTooLarge`.
    exceeded_limit: Cell<Option<u64>>,
}

impl Default for StreamBudget {
    fn default() -> Self {
        Self {
            phase: Cell::new(StreamPhase::Headers),
            metadata_bytes_for_next_entry: Cell::new(0),
            metadata_bytes_total: Cell::new(0),
            exceeded_limit: Cell::new(None),
        }
    }
}

impl StreamBudget {
    fn begin_headers(&self) {
        self.phase.set(StreamPhase::Headers);
        self.metadata_bytes_for_next_entry.set(0);
    }

    fn begin_entry_data(&self) {
        self.phase.set(StreamPhase::EntryData);
    }

    /// After the tar reader reports the end of the archive: it stops either
    /// at an all-zero header block (a complete archive) or at the end of the
    /// stream. Padding before it is under one block, so having read a whole
    /// block means the marker was there.
    fn read_end_of_archive_block(&self) -> bool {
        self.metadata_bytes_for_next_entry.get() >= TAR_BLOCK_BYTES
    }
}

/// Counts decompressed bytes read as metadata and fails the read once a
/// metadata limit is reached, before the tar reader buffers more.
struct BudgetedReader<R> {
    inner: R,
    budget: Rc<StreamBudget>,
}

impl<R: Read> Read for BudgetedReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.budget.phase.get() == StreamPhase::EntryData {
            return self.inner.read(buffer);
        }
        let left_for_entry = MAX_METADATA_BYTES_PER_ENTRY
            .saturating_sub(self.budget.metadata_bytes_for_next_entry.get());
        let left_in_total =
            MAX_METADATA_BYTES_TOTAL.saturating_sub(self.budget.metadata_bytes_total.get());
        let (allowed_bytes, binding_limit) = if left_for_entry <= left_in_total {
            (left_for_entry, MAX_METADATA_BYTES_PER_ENTRY)
        } else {
            (left_in_total, MAX_METADATA_BYTES_TOTAL)
        };
        if allowed_bytes == 0 && !buffer.is_empty() {
            self.budget.exceeded_limit.set(Some(binding_limit));
            return Err(io::Error::other(format!(
                "archive metadata exceeds {binding_limit} bytes"
            )));
        }
        let window = usize::try_from(allowed_bytes)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        let bytes_read = self.inner.read(&mut buffer[..window])?;
        let bytes_read_u64 = bytes_read as u64;
        self.budget.metadata_bytes_for_next_entry.set(
            self.budget
                .metadata_bytes_for_next_entry
                .get()
                .saturating_add(bytes_read_u64),
        );
        self.budget.metadata_bytes_total.set(
            self.budget
                .metadata_bytes_total
                .get()
                .saturating_add(bytes_read_u64),
        );
        Ok(bytes_read)
    }
}

/// Reports a failure to read the decompressed stream: a metadata budget hit,
/// or else a truncated/garbled tar or zstd stream.
fn stream_error(
    budget: &StreamBudget,
    near_entry: Option<&Path>,
    source: io::Error,
) -> UnpackError {
    let near_entry = near_entry.map(Path::to_path_buf);
    match budget.exceeded_limit.get() {
        Some(limit) => UnpackError::MetadataTooLarge { near_entry, limit },
        None => UnpackError::Corrupt { near_entry, source },
    }
}

/// The entry types an image may contain, plus the PAX global header, which
/// carries only archive-wide metadata and is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptedEntryKind {
    RegularFile,
    Directory,
    Symlink,
    HardLink,
    PaxGlobalHeader,
}

/// Classifies an entry type, or returns a description of the refused type.
/// GNU long names and per-entry PAX headers never get here in a ustar/GNU
/// archive: the tar reader folds them into the entry they describe.
fn classify_entry_type(entry_type: tar::EntryType) -> Result<AcceptedEntryKind, String> {
    match entry_type {
        // Contiguous files are regular files to every extractor.
        tar::EntryType::Regular | tar::EntryType::Continuous => Ok(AcceptedEntryKind::RegularFile),
        tar::EntryType::Directory => Ok(AcceptedEntryKind::Directory),
        tar::EntryType::Symlink => Ok(AcceptedEntryKind::Symlink),
        tar::EntryType::Link => Ok(AcceptedEntryKind::HardLink),
        tar::EntryType::XGlobalHeader => Ok(AcceptedEntryKind::PaxGlobalHeader),
        tar::EntryType::Char => Err("character device".to_owned()),
        tar::EntryType::Block => Err("block device".to_owned()),
        tar::EntryType::Fifo => Err("FIFO".to_owned()),
        tar::EntryType::GNUSparse => Err("GNU sparse file".to_owned()),
        tar::EntryType::GNULongName | tar::EntryType::GNULongLink | tar::EntryType::XHeader => {
            Err("name/PAX extension header in a pre-POSIX (v7) archive".to_owned())
        }
        other => Err(format!(
            "entry of unknown type {:?}",
            char::from(other.as_byte())
        )),
    }
}

/// Normalizes an archive path (an entry name or a hard-link target, both
/// relative to the image root): `.` components and empty components (from
/// `//` or a trailing `/`) are dropped. Returns `None` when the path names
/// the root itself, or why it is refused.
fn normalize_archive_path(raw_path: &[u8]) -> Result<Option<PathBuf>, String> {
    if raw_path.is_empty() {
        return Err("the name is empty".to_owned());
    }
    if raw_path.contains(&0) {
        return Err("the name contains a NUL byte".to_owned());
    }
    if raw_path.starts_with(b"/") {
        return Err("absolute paths are refused".to_owned());
    }
    let mut normalized = PathBuf::new();
    for component in raw_path.split(|byte| *byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err("`..` components are refused".to_owned()),
            name => normalized.push(std::ffi::OsStr::from_bytes(name)),
        }
    }
    if normalized.as_os_str().is_empty() {
        Ok(None)
    } else {
        Ok(Some(normalized))
    }
}

/// Checks a symlink target against the rule in the module documentation:
/// relative, leading `..` only, never climbing above the image root.
/// `link_relative` is the link's normalized path inside the root.
fn check_symlink_target(link_relative: &Path, target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("the target is empty".to_owned());
    }
    if target.contains(&0) {
        return Err("the target contains a NUL byte".to_owned());
    }
    if target.starts_with(b"/") {
        return Err(
            "absolute targets are refused: they would resolve against the machine's root, \
             not the image's"
                .to_owned(),
        );
    }
    let link_depth_below_root = link_relative.components().count().saturating_sub(1);
    let mut parent_steps = 0usize;
    let mut seen_named_component = false;
    for component in target.split(|byte| *byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." if seen_named_component => {
                return Err(
                    "`..` after a named component is refused: that name could be another \
                     symlink, so where `..` leads cannot be checked"
                        .to_owned(),
                );
            }
            b".." => {
                parent_steps += 1;
                if parent_steps > link_depth_below_root {
                    return Err(format!(
                        "{parent_steps} leading `..` climb above the image root from a link \
                         at depth {link_depth_below_root}"
                    ));
                }
            }
            _ => seen_named_component = true,
        }
    }
    Ok(())
}

fn path_from_archive_bytes(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes.to_vec()))
}

struct ImageUnpacker<'policy> {
    image_root: PathBuf,
    policy: &'policy UnpackPolicy,
    summary: UnpackSummary,
    /// Declared data sizes of all entries so far, checked against the policy
    /// before an entry is written.
    declared_bytes: u64,
    /// Directories whose archive mode lacks owner `rwx`, applied at the end.
    restrictive_directory_modes: HashMap<PathBuf, u32>,
    copy_buffer: Vec<u8>,
    stream_budget: Rc<StreamBudget>,
    /// The last entry read, named by errors that happen between entries.
    last_entry: Option<PathBuf>,
}

impl ImageUnpacker<'_> {
    fn unpack_all_entries<R: Read>(
        &mut self,
        archive: &mut tar::Archive<R>,
    ) -> Result<(), UnpackError> {
        let mut entries = archive
            .entries()
            .map_err(|source| stream_error(&self.stream_budget, None, source))?;
        loop {
            self.stream_budget.begin_headers();
            let next_entry = entries.next();
            self.stream_budget.begin_entry_data();
            let mut entry = match next_entry {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(source)) => {
                    return Err(stream_error(
                        &self.stream_budget,
                        self.last_entry.as_deref(),
                        source,
                    ));
                }
            };
            let entry_name = path_from_archive_bytes(&entry.path_bytes());
            self.last_entry = Some(entry_name.clone());
            self.unpack_entry(&mut entry, &entry_name)?;
        }
        if !self.stream_budget.read_end_of_archive_block() {
            return Err(UnpackError::Corrupt {
                near_entry: self.last_entry.clone(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the archive ends without the tar end-of-archive block",
                ),
            });
        }
        Ok(())
    }

    /// Validates one entry completely (type, path, mode, size, link target,
    /// parents) before creating it.
    fn unpack_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        entry_name: &Path,
    ) -> Result<(), UnpackError> {
        let kind = classify_entry_type(entry.header().entry_type()).map_err(|kind| {
            UnpackError::ForbiddenType {
                entry: entry_name.to_path_buf(),
                kind,
            }
        })?;
        if kind == AcceptedEntryKind::PaxGlobalHeader {
            // Its data is skipped by the tar reader, as bounded metadata.
            return Ok(());
        }
        let relative_path =
            normalize_archive_path(entry_name.as_os_str().as_bytes()).map_err(|reason| {
                UnpackError::UnsafePath {
                    entry: entry_name.to_path_buf(),
                    reason,
                }
            })?;
        let permission_bits = entry
            .header()
            .mode()
            .map_err(|source| UnpackError::Corrupt {
                near_entry: Some(entry_name.to_path_buf()),
                source,
            })?
            & PERMISSION_BITS;
        let mode_is_applied = matches!(
            kind,
            AcceptedEntryKind::RegularFile | AcceptedEntryKind::Directory
        );
        if mode_is_applied && permission_bits & SETUID_SETGID_BITS != 0 && !self.policy.allow_setuid
        {
            return Err(UnpackError::Setuid {
                entry: entry_name.to_path_buf(),
                mode: permission_bits,
            });
        }
        let declared_size = entry.size();
        self.declared_bytes = self
            .declared_bytes
            .checked_add(declared_size)
            .filter(|total| *total <= self.policy.max_total_bytes)
            .ok_or_else(|| UnpackError::TooLarge {
                entry: entry_name.to_path_buf(),
                limit: self.policy.max_total_bytes,
            })?;

        match (kind, relative_path) {
            // `./` itself: the root exists already and keeps its own mode.
            (AcceptedEntryKind::Directory, None) => {}
            (_, None) => {
                return Err(UnpackError::UnsafePath {
                    entry: entry_name.to_path_buf(),
                    reason: "it names the image root itself but is not a directory".to_owned(),
                });
            }
            (AcceptedEntryKind::RegularFile, Some(relative_path)) => {
                // Only v7 archives mark directories this way; writing a file
                // at `name/` would fail anyway, so say why.
                if entry_name.as_os_str().as_bytes().ends_with(b"/") {
                    return Err(UnpackError::UnsafePath {
                        entry: entry_name.to_path_buf(),
                        reason: "a regular file whose name ends with `/`".to_owned(),
                    });
                }
                return self.unpack_regular_file(
                    entry,
                    entry_name,
                    &relative_path,
                    declared_size,
                    permission_bits,
                );
            }
            (AcceptedEntryKind::Directory, Some(relative_path)) => {
                self.unpack_directory(entry_name, &relative_path, permission_bits)?;
            }
            (AcceptedEntryKind::Symlink, Some(relative_path)) => {
                let target = entry
                    .link_name_bytes()
                    .map(|bytes| path_from_archive_bytes(&bytes))
                    .unwrap_or_default();
                self.unpack_symlink(entry_name, &relative_path, &target)?;
            }
            (AcceptedEntryKind::HardLink, Some(relative_path)) => {
                let target = entry
                    .link_name_bytes()
                    .map(|bytes| path_from_archive_bytes(&bytes))
                    .unwrap_or_default();
                self.unpack_hard_link(entry_name, &relative_path, &target)?;
            }
            (AcceptedEntryKind::PaxGlobalHeader, Some(_)) => {}
        }
        // Entries other than files normally carry no data; whatever they
        // declare was counted above and is read (and dropped) here so the
        // tar reader does not skip it as unbounded "metadata".
        if declared_size > 0 {
            self.copy_entry_data(
                entry,
                &mut io::sink(),
                entry_name,
                entry_name,
                declared_size,
            )?;
        }
        Ok(())
    }

    fn unpack_regular_file<R: Read>(
        &mut self,
        entry: &mut R,
        entry_name: &Path,
        relative_path: &Path,
        declared_size: u64,
        permission_bits: u32,
    ) -> Result<(), UnpackError> {
        self.create_parent_directories(entry_name, relative_path)?;
        let file_path = self.image_root.join(relative_path);
        self.ensure_path_is_free(entry_name, &file_path)?;
        // `create_new` is O_CREAT | O_EXCL: it never opens an existing file
        // and refuses a symlink in the final component, even a dangling one.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(MODE_WHILE_WRITING_FILE)
            .open(&file_path)
            .map_err(io_error_at(&file_path))?;
        let bytes_written =
            self.copy_entry_data(entry, &mut file, &file_path, entry_name, declared_size)?;
        self.summary.total_bytes = self.summary.total_bytes.saturating_add(bytes_written);
        // fchmod on the open file: exact bits, no umask, no path lookup.
        file.set_permissions(Permissions::from_mode(permission_bits))
            .map_err(io_error_at(&file_path))?;
        self.summary.files += 1;
        Ok(())
    }

    fn unpack_directory(
        &mut self,
        entry_name: &Path,
        relative_path: &Path,
        permission_bits: u32,
    ) -> Result<(), UnpackError> {
        self.create_parent_directories(entry_name, relative_path)?;
        let directory_path = self.image_root.join(relative_path);
        let mode_while_unpacking = permission_bits | OWNER_READ_WRITE_SEARCH;
        match fs::symlink_metadata(&directory_path) {
            // Listed again, or implied earlier by a deeper entry.
            Ok(metadata) if metadata.is_dir() => {
                fs::set_permissions(
                    &directory_path,
                    Permissions::from_mode(mode_while_unpacking),
                )
                .map_err(io_error_at(&directory_path))?;
            }
            Ok(_) => {
                return Err(UnpackError::UnsafePath {
                    entry: entry_name.to_path_buf(),
                    reason: "a previous entry created this path as something other than a \
                             directory"
                        .to_owned(),
                });
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                create_directory_with_mode(&directory_path, mode_while_unpacking)
                    .map_err(io_error_at(&directory_path))?;
                self.summary.directories += 1;
            }
            Err(error) => return Err(io_error_at(&directory_path)(error)),
        }
        if permission_bits == mode_while_unpacking {
            self.restrictive_directory_modes.remove(relative_path);
        } else {
            self.restrictive_directory_modes
                .insert(relative_path.to_path_buf(), permission_bits);
        }
        Ok(())
    }

    fn unpack_symlink(
        &mut self,
        entry_name: &Path,
        relative_path: &Path,
        target: &Path,
    ) -> Result<(), UnpackError> {
        check_symlink_target(relative_path, target.as_os_str().as_bytes()).map_err(|reason| {
            UnpackError::SymlinkEscape {
                entry: entry_name.to_path_buf(),
                target: target.to_path_buf(),
                reason,
            }
        })?;
        self.create_parent_directories(entry_name, relative_path)?;
        let link_path = self.image_root.join(relative_path);
        self.ensure_path_is_free(entry_name, &link_path)?;
        // symlink(2) fails if the path exists; it never follows anything.
        std::os::unix::fs::symlink(target, &link_path).map_err(io_error_at(&link_path))?;
        self.summary.symlinks += 1;
        Ok(())
    }

    fn unpack_hard_link(
        &mut self,
        entry_name: &Path,
        relative_path: &Path,
        target: &Path,
    ) -> Result<(), UnpackError> {
        let refuse = |reason: String| UnpackError::HardlinkEscape {
            entry: entry_name.to_path_buf(),
            target: target.to_path_buf(),
            reason,
        };
        let target_relative = match normalize_archive_path(target.as_os_str().as_bytes()) {
            Ok(Some(target_relative)) => target_relative,
            Ok(None) => return Err(refuse("the target is the image root".to_owned())),
            Err(reason) => return Err(refuse(format!("bad target: {reason}"))),
        };
        self.check_hard_link_target(&target_relative)
            .map_err(|reason| match reason {
                HardLinkTargetProblem::Refused(reason) => refuse(reason),
                HardLinkTargetProblem::Io(path, source) => UnpackError::Io { path, source },
            })?;
        self.create_parent_directories(entry_name, relative_path)?;
        let link_path = self.image_root.join(relative_path);
        self.ensure_path_is_free(entry_name, &link_path)?;
        // link(2) does not follow a symlink at the source; the source was
        // just checked to be a regular file reached through directories.
        fs::hard_link(self.image_root.join(&target_relative), &link_path)
            .map_err(io_error_at(&link_path))?;
        self.summary.files += 1;
        Ok(())
    }

    /// A hard link may only point at a regular file unpacked earlier, reached
    /// through real directories: that file is then inside the root, and it
    /// was created by this unpack.
    fn check_hard_link_target(&self, target_relative: &Path) -> Result<(), HardLinkTargetProblem> {
        let mut current_path = self.image_root.clone();
        let component_count = target_relative.components().count();
        for (index, component) in target_relative.components().enumerate() {
            current_path.push(component);
            let is_last = index + 1 == component_count;
            let metadata = match fs::symlink_metadata(&current_path) {
                Ok(metadata) => metadata,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    return Err(HardLinkTargetProblem::Refused(
                        "the target does not exist: hard links must point to a file unpacked \
                         earlier in the archive"
                            .to_owned(),
                    ));
                }
                Err(error) => return Err(HardLinkTargetProblem::Io(current_path, error)),
            };
            let file_type = metadata.file_type();
            if file_type.is_symlink() {
                return Err(HardLinkTargetProblem::Refused(
                    "the target is reached through a symlink".to_owned(),
                ));
            }
            if is_last && !file_type.is_file() {
                return Err(HardLinkTargetProblem::Refused(
                    "the target is not a regular file".to_owned(),
                ));
            }
            if !is_last && !file_type.is_dir() {
                return Err(HardLinkTargetProblem::Refused(
                    "a parent of the target is not a directory".to_owned(),
                ));
            }
        }
        Ok(())
    }

    /// Creates the missing parents of an entry, refusing any existing parent
    /// that is not a real directory. This is the tar-slip guard: after
    /// `a -> /etc`, the entry `a/passwd` is refused here, never written
    /// through the link (links inside the image are refused as parents too).
    fn create_parent_directories(
        &mut self,
        entry_name: &Path,
        relative_path: &Path,
    ) -> Result<(), UnpackError> {
        let Some(relative_parent) = relative_path.parent() else {
            return Ok(());
        };
        let mut current_path = self.image_root.clone();
        let mut current_relative = PathBuf::new();
        for component in relative_parent.components() {
            current_path.push(component);
            current_relative.push(component);
            match fs::symlink_metadata(&current_path) {
                Ok(metadata) if metadata.file_type().is_symlink() => {
                    return Err(UnpackError::UnsafePath {
                        entry: entry_name.to_path_buf(),
                        reason: format!(
                            "its parent `{}` is a symlink; entries are never written through \
                             symlinks",
                            current_relative.display()
                        ),
                    });
                }
                Ok(metadata) if metadata.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::UnsafePath {
                        entry: entry_name.to_path_buf(),
                        reason: format!(
                            "its parent `{}` is not a directory",
                            current_relative.display()
                        ),
                    });
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    create_directory_with_mode(&current_path, UNPACKED_DIRECTORY_MODE)
                        .map_err(io_error_at(&current_path))?;
                    self.summary.directories += 1;
                }
                Err(error) => return Err(io_error_at(&current_path)(error)),
            }
        }
        Ok(())
    }

    /// Entries never replace each other (a later entry replacing a symlink or
    /// a hard link is how extractors get tricked into writing elsewhere).
    /// Creation is exclusive anyway; this gives the refusal a clear message.
    fn ensure_path_is_free(&self, entry_name: &Path, path: &Path) -> Result<(), UnpackError> {
        match fs::symlink_metadata(path) {
            Ok(_) => Err(UnpackError::UnsafePath {
                entry: entry_name.to_path_buf(),
                reason: "a previous entry already created this path; entries never replace \
                         each other"
                    .to_owned(),
            }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error_at(path)(error)),
        }
    }

    /// Copies an entry's data, requiring exactly `declared_size` bytes: fewer
    /// means a truncated archive, more (impossible through the tar reader,
    /// checked anyway) a header lying about its size. Read failures are
    /// stream errors naming the entry; write failures are I/O errors at
    /// `writer_path`.
    fn copy_entry_data<R: Read, W: Write>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        writer_path: &Path,
        entry_name: &Path,
        declared_size: u64,
    ) -> Result<u64, UnpackError> {
        let mut bytes_copied: u64 = 0;
        loop {
            let bytes_read = match reader.read(&mut self.copy_buffer) {
                Ok(0) => break,
                Ok(bytes_read) => bytes_read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(stream_error(&self.stream_budget, Some(entry_name), error));
                }
            };
            bytes_copied = bytes_copied.saturating_add(bytes_read as u64);
            if bytes_copied > declared_size {
                return Err(UnpackError::TooLarge {
                    entry: entry_name.to_path_buf(),
                    limit: self.policy.max_total_bytes,
                });
            }
            writer
                .write_all(&self.copy_buffer[..bytes_read])
                .map_err(io_error_at(writer_path))?;
        }
        if bytes_copied < declared_size {
            return Err(UnpackError::Corrupt {
                near_entry: Some(entry_name.to_path_buf()),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the entry's data ends after {bytes_copied} of {declared_size} bytes"),
                ),
            });
        }
        Ok(bytes_copied)
    }

    /// Applies the archive's modes that lack owner `rwx`, deepest first so
    /// that a parent losing search permission does not block its children.
    fn apply_restrictive_directory_modes(&mut self) -> Result<(), UnpackError> {
        let mut directories: Vec<(PathBuf, u32)> =
            self.restrictive_directory_modes.drain().collect();
        directories.sort_by_key(|(relative_path, _)| {
            std::cmp::Reverse(relative_path.components().count())
        });
        for (relative_path, mode) in directories {
            let directory_path = self.image_root.join(&relative_path);
            fs::set_permissions(&directory_path, Permissions::from_mode(mode))
                .map_err(io_error_at(&directory_path))?;
        }
        Ok(())
    }
}

enum HardLinkTargetProblem {
    Refused(String),
    Io(PathBuf, io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use tar::{EntryType, Header};

    fn default_policy() -> UnpackPolicy {
        UnpackPolicy {
            max_total_bytes: 1024 * 1024,
            allow_setuid: false,
        }
    }

    /// A scratch directory holding the payload, `images/` (where the
    /// destination goes) and a sentinel directory next to it that attacks
    /// aim at. Removed on drop.
    struct Scratch {
        root: PathBuf,
    }

    impl Scratch {
        fn new() -> Self {
            let root = std::env::temp_dir().join(format!("flotte-unpack-{}", uuid::Uuid::new_v4()));
            fs::create_dir_all(root.join("images")).unwrap();
            fs::create_dir_all(root.join("sentinel")).unwrap();
            fs::write(root.join("sentinel/keep.txt"), b"untouched").unwrap();
            Self { root }
        }

        fn destination(&self) -> PathBuf {
            self.root.join("images/dest")
        }

        fn archive_path(&self) -> PathBuf {
            self.root.join("payload.tar.zst")
        }

        fn sentinel(&self) -> PathBuf {
            self.root.join("sentinel")
        }

        /// Everything under the scratch root: path -> what it is.
        fn snapshot(&self) -> BTreeMap<PathBuf, String> {
            let mut snapshot = BTreeMap::new();
            let mut pending = vec![self.root.clone()];
            while let Some(path) = pending.pop() {
                let metadata = fs::symlink_metadata(&path).unwrap();
                let relative = path.strip_prefix(&self.root).unwrap().to_path_buf();
                let description = if metadata.file_type().is_symlink() {
                    format!("symlink -> {}", fs::read_link(&path).unwrap().display())
                } else if metadata.is_dir() {
                    for child in fs::read_dir(&path).unwrap() {
                        pending.push(child.unwrap().path());
                    }
                    format!("dir {:o}", metadata.mode() & 0o7777)
                } else {
                    format!("file {:?}", fs::read(&path).unwrap())
                };
                snapshot.insert(relative, description);
            }
            snapshot
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = remove_unpacked_tree(&self.root);
        }
    }

    /// Builds archives entry by entry from raw headers, so that names the
    /// `tar` builder refuses (`..`, absolute) can be written.
    struct TestArchive {
        builder: tar::Builder<Vec<u8>>,
    }

    impl TestArchive {
        fn new() -> Self {
            Self {
                builder: tar::Builder::new(Vec::new()),
            }
        }

        fn entry(
            mut self,
            name: &[u8],
            entry_type: EntryType,
            mode: u32,
            link_name: Option<&[u8]>,
            data: &[u8],
        ) -> Self {
            let mut header = Header::new_gnu();
            let name_field = &mut header.as_old_mut().name;
            assert!(name.len() <= name_field.len(), "use a GNU long name");
            name_field[..name.len()].copy_from_slice(name);
            header.set_entry_type(entry_type);
            header.set_mode(mode);
            header.set_size(data.len() as u64);
            // Ownership that must not be applied.
            header.set_uid(4242);
            header.set_gid(4242);
            header.set_mtime(0);
            if let Some(link_name) = link_name {
                header.set_link_name_literal(link_name).unwrap();
            }
            header.set_cksum();
            self.builder.append(&header, data).unwrap();
            self
        }

        fn file(self, name: &str, mode: u32, data: &[u8]) -> Self {
            self.entry(name.as_bytes(), EntryType::Regular, mode, None, data)
        }

        fn directory(self, name: &str, mode: u32) -> Self {
            self.entry(name.as_bytes(), EntryType::Directory, mode, None, b"")
        }

        fn symlink(self, name: &str, target: &str) -> Self {
            self.entry(
                name.as_bytes(),
                EntryType::Symlink,
                0o777,
                Some(target.as_bytes()),
                b"",
            )
        }

        fn hard_link(self, name: &str, target: &str) -> Self {
            self.entry(
                name.as_bytes(),
                EntryType::Link,
                0o644,
                Some(target.as_bytes()),
                b"",
            )
        }

        /// A GNU long-name header: the next entry is named `long_name`.
        fn gnu_long_name(self, long_name: &[u8]) -> Self {
            let mut data = long_name.to_vec();
            data.push(0);
            self.entry(b"././@LongLink", EntryType::GNULongName, 0o644, None, &data)
        }

        /// A PAX header: the next entry is named `path`.
        fn pax_path(self, path: &[u8]) -> Self {
            let data = pax_record("path", path);
            self.entry(b"PaxHeaders/next", EntryType::XHeader, 0o644, None, &data)
        }

        fn tar_bytes(self) -> Vec<u8> {
            self.builder.into_inner().unwrap()
        }

        fn compressed(self) -> Vec<u8> {
            zstd::encode_all(&self.tar_bytes()[..], 3).unwrap()
        }
    }

    /// One PAX record: "<length> <key>=<value>\n", the length counting
    /// itself.
    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let body_length = 1 + key.len() + 1 + value.len() + 1;
        let mut total_length = body_length + 1;
        while total_length.to_string().len() + body_length != total_length {
            total_length = total_length.to_string().len() + body_length;
        }
        let mut record = format!("{total_length} {key}=").into_bytes();
        record.extend_from_slice(value);
        record.push(b'\n');
        assert_eq!(record.len(), total_length);
        record
    }

    /// Unpacks `payload` in a fresh scratch directory and asserts a clean
    /// refusal: an error, no destination, nothing else changed.
    fn assert_refused_bytes(payload: &[u8], policy: &UnpackPolicy) -> UnpackError {
        let scratch = Scratch::new();
        assert_refused_in(&scratch, payload, policy)
    }

    fn assert_refused_in(scratch: &Scratch, payload: &[u8], policy: &UnpackPolicy) -> UnpackError {
        fs::write(scratch.archive_path(), payload).unwrap();
        let before = scratch.snapshot();
        let result = unpack_payload(&scratch.archive_path(), &scratch.destination(), policy);
        let error = match result {
            Ok(summary) => panic!("expected a refusal, got {summary:?}"),
            Err(error) => error,
        };
        assert!(
            fs::symlink_metadata(scratch.destination()).is_err(),
            "the partial unpack must be removed ({error})"
        );
        assert_eq!(
            scratch.snapshot(),
            before,
            "nothing outside may change ({error})"
        );
        error
    }

    fn assert_refused(archive: TestArchive) -> UnpackError {
        assert_refused_bytes(&archive.compressed(), &default_policy())
    }

    fn assert_names_entry(error: &UnpackError, entry_name: &str) {
        assert!(
            error.to_string().contains(&format!("`{entry_name}`")),
            "error should name `{entry_name}`: {error}"
        );
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

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
    fn refuses_parent_directory_escape() {
        let error = assert_refused(TestArchive::new().file("../evil", 0o644, b"x"));
        assert!(
            matches!(&error, UnpackError::UnsafePath { entry, .. } if entry == Path::new("../evil"))
        );
        assert_names_entry(&error, "../evil");
    }

    #[test]
    fn refuses_absolute_path() {
        let scratch = Scratch::new();
        let target = scratch.sentinel().join("pwned");
        let target_name = target.to_str().unwrap().to_owned();
        let archive = TestArchive::new().file(&target_name, 0o644, b"x");
        let error = assert_refused_in(&scratch, &archive.compressed(), &default_policy());
        assert!(matches!(&error, UnpackError::UnsafePath { entry, .. } if entry == &target));
        assert_names_entry(&error, &target_name);

        let error = assert_refused(TestArchive::new().file("/abs", 0o644, b"x"));
        assert_names_entry(&error, "/abs");
    }

    #[test]
    fn refuses_dot_dot_inside_a_path() {
        let error = assert_refused(TestArchive::new().directory("a/", 0o755).file(
            "a/../../evil",
            0o644,
            b"x",
        ));
        assert!(matches!(&error, UnpackError::UnsafePath { .. }));
        assert_names_entry(&error, "a/../../evil");
    }

    #[test]
    fn refuses_dot_dot_in_a_gnu_long_name_and_a_pax_path() {
        let long_escape = format!("{}/../../../evil", "a/".repeat(60));
        let error = assert_refused(
            TestArchive::new()
                .gnu_long_name(long_escape.as_bytes())
                .file("harmless", 0o644, b"x"),
        );
        assert!(matches!(&error, UnpackError::UnsafePath { .. }));
        assert_names_entry(&error, &long_escape);

        let error = assert_refused(
            TestArchive::new()
                .pax_path(b"../evil")
                .file("harmless", 0o644, b"x"),
        );
        assert!(
            matches!(&error, UnpackError::UnsafePath { entry, .. } if entry == Path::new("../evil"))
        );
    }

    #[test]
    fn refuses_symlink_escaping_the_root() {
        let error = assert_refused(
            TestArchive::new()
                .directory("dir/", 0o755)
                .symlink("dir/link", "../../etc"),
        );
        assert!(
            matches!(&error, UnpackError::SymlinkEscape { entry, target, .. }
                if entry == Path::new("dir/link") && target == Path::new("../../etc"))
        );
        assert_names_entry(&error, "dir/link");
    }

    #[test]
    fn refuses_absolute_symlink() {
        let error = assert_refused(TestArchive::new().symlink("etc-link", "/etc"));
        assert!(matches!(&error, UnpackError::SymlinkEscape { .. }));
        assert_names_entry(&error, "etc-link");
    }

    #[test]
    fn refuses_symlink_chains_that_would_escape_through_another_link() {
        // Lexically `d/e/l2 -> ../l1/..` stays inside, but `d/l1 -> ..` is
        // the root, so `l2` would point above it.
        let error = assert_refused(
            TestArchive::new()
                .directory("d/e/", 0o755)
                .symlink("d/l1", "..")
                .symlink("d/e/l2", "../l1/.."),
        );
        assert!(matches!(&error, UnpackError::SymlinkEscape { .. }));
        assert_names_entry(&error, "d/e/l2");
    }

    #[test]
    fn refuses_hard_link_outside_the_root() {
        let error = assert_refused(TestArchive::new().hard_link("link", "../outside"));
        assert!(
            matches!(&error, UnpackError::HardlinkEscape { entry, target, .. }
                if entry == Path::new("link") && target == Path::new("../outside"))
        );
        assert_names_entry(&error, "link");
    }

    #[test]
    fn refuses_hard_link_to_a_missing_entry() {
        let error = assert_refused(
            TestArchive::new()
                .file("present", 0o644, b"x")
                .hard_link("link", "missing"),
        );
        assert!(matches!(&error, UnpackError::HardlinkEscape { .. }));
        assert_names_entry(&error, "link");
    }

    #[test]
    fn refuses_hard_link_through_a_symlink_or_to_a_directory() {
        let error = assert_refused(
            TestArchive::new()
                .file("sub/file", 0o644, b"x")
                .symlink("alias", "sub")
                .hard_link("link", "alias/file"),
        );
        assert!(matches!(&error, UnpackError::HardlinkEscape { .. }));
        assert_names_entry(&error, "link");

        let error = assert_refused(
            TestArchive::new()
                .directory("sub/", 0o755)
                .hard_link("link", "sub"),
        );
        assert!(matches!(&error, UnpackError::HardlinkEscape { .. }));
    }

    #[test]
    fn refuses_writing_through_an_escaping_symlink() {
        // The classic tar slip: `dir -> <outside>` then `dir/file`. The link
        // itself is refused first, since it is absolute.
        let scratch = Scratch::new();
        let sentinel = scratch.sentinel();
        let archive = TestArchive::new()
            .symlink("dir", sentinel.to_str().unwrap())
            .file("dir/file", 0o644, b"pwned");
        let error = assert_refused_in(&scratch, &archive.compressed(), &default_policy());
        assert!(
            matches!(&error, UnpackError::SymlinkEscape { entry, .. } if entry == Path::new("dir"))
        );

        let error = assert_refused(TestArchive::new().symlink("dir", "../../sentinel").file(
            "dir/keep.txt",
            0o644,
            b"pwned",
        ));
        assert_names_entry(&error, "dir");
    }

    #[test]
    fn refuses_writing_through_a_symlink_inside_the_root() {
        let error = assert_refused(
            TestArchive::new()
                .directory("sub/", 0o755)
                .symlink("alias", "sub")
                .file("alias/file", 0o644, b"x"),
        );
        assert!(
            matches!(&error, UnpackError::UnsafePath { entry, .. } if entry == Path::new("alias/file"))
        );
        assert_names_entry(&error, "alias/file");

        let error = assert_refused(
            TestArchive::new()
                .directory("sub/", 0o755)
                .symlink("alias", "sub")
                .directory("alias/", 0o755),
        );
        assert_names_entry(&error, "alias/");
    }

    #[test]
    fn refuses_an_entry_replacing_an_earlier_one() {
        let error = assert_refused(
            TestArchive::new()
                .directory("sub/", 0o755)
                .symlink("alias", "sub")
                .file("alias", 0o644, b"x"),
        );
        assert!(
            matches!(&error, UnpackError::UnsafePath { entry, .. } if entry == Path::new("alias"))
        );

        let error = assert_refused(
            TestArchive::new()
                .file("twice", 0o644, b"x")
                .file("twice", 0o644, b"y"),
        );
        assert_names_entry(&error, "twice");
    }

    #[test]
    fn refuses_devices_and_fifos() {
        for (entry_type, kind) in [
            (EntryType::Char, "character device"),
            (EntryType::Block, "block device"),
            (EntryType::Fifo, "FIFO"),
        ] {
            let error = assert_refused(TestArchive::new().file("before", 0o644, b"x").entry(
                b"dev/node",
                entry_type,
                0o666,
                None,
                b"",
            ));
            assert!(
                matches!(&error, UnpackError::ForbiddenType { entry, kind: refused_kind }
                    if entry == Path::new("dev/node") && refused_kind == kind),
                "{error}"
            );
            assert_names_entry(&error, "dev/node");
        }
    }

    #[test]
    fn refuses_gnu_sparse_files() {
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..6].copy_from_slice(b"sparse");
        header.set_entry_type(EntryType::GNUSparse);
        header.set_mode(0o644);
        header.set_size(0);
        header.as_gnu_mut().unwrap().set_real_size(0);
        header.set_cksum();
        let mut archive = TestArchive::new();
        archive.builder.append(&header, &b""[..]).unwrap();
        let error = assert_refused(archive);
        assert!(
            matches!(&error, UnpackError::ForbiddenType { entry, .. } if entry == Path::new("sparse")),
            "{error}"
        );
        assert_names_entry(&error, "sparse");
    }

    #[test]
    fn refuses_setuid_and_setgid_unless_allowed() {
        let error = assert_refused(TestArchive::new().file("bin/su", 0o4755, b"x"));
        assert!(matches!(&error, UnpackError::Setuid { entry, mode }
                if entry == Path::new("bin/su") && *mode == 0o4755));
        assert_names_entry(&error, "bin/su");

        let error = assert_refused(TestArchive::new().directory("shared/", 0o2775));
        assert!(matches!(&error, UnpackError::Setuid { .. }));
        assert_names_entry(&error, "shared/");
    }

    #[test]
    fn keeps_setuid_when_the_policy_allows_it() {
        let scratch = Scratch::new();
        let archive = TestArchive::new()
            .file("bin/su", 0o4755, b"x")
            .directory("shared/", 0o2775);
        fs::write(scratch.archive_path(), archive.compressed()).unwrap();
        let policy = UnpackPolicy {
            allow_setuid: true,
            ..default_policy()
        };
        unpack_payload(&scratch.archive_path(), &scratch.destination(), &policy).unwrap();
        assert_eq!(mode_of(&scratch.destination().join("bin/su")), 0o4755);
        assert_eq!(mode_of(&scratch.destination().join("shared")), 0o2775);
    }

    #[test]
    fn refuses_archives_over_the_size_limit() {
        let policy = UnpackPolicy {
            max_total_bytes: 1000,
            allow_setuid: false,
        };
        let archive = TestArchive::new()
            .file("first", 0o644, &[7; 600])
            .file("second", 0o644, &[7; 600]);
        let error = assert_refused_bytes(&archive.compressed(), &policy);
        assert!(matches!(&error, UnpackError::TooLarge { entry, limit }
                if entry == Path::new("second") && *limit == 1000));
        assert_names_entry(&error, "second");
        assert!(error.to_string().contains("1000"));
    }

    #[test]
    fn accepts_an_archive_exactly_at_the_size_limit() {
        let scratch = Scratch::new();
        let archive = TestArchive::new()
            .file("first", 0o644, &[7; 600])
            .file("second", 0o644, &[7; 400]);
        fs::write(scratch.archive_path(), archive.compressed()).unwrap();
        let policy = UnpackPolicy {
            max_total_bytes: 1000,
            allow_setuid: false,
        };
        let summary =
            unpack_payload(&scratch.archive_path(), &scratch.destination(), &policy).unwrap();
        assert_eq!(summary.total_bytes, 1000);
    }

    #[test]
    fn refuses_a_truncated_tar_whose_header_promises_more_data() {
        let tar_bytes = TestArchive::new()
            .file("complete", 0o644, b"fine")
            .file("big", 0o644, &[1; 4096])
            .tar_bytes();
        // Two headers, the first entry's padded data, then 1000 of 4096 bytes.
        let truncated = &tar_bytes[..512 + 512 + 512 + 1000];
        let payload = zstd::encode_all(truncated, 3).unwrap();
        let error = assert_refused_bytes(&payload, &default_policy());
        assert!(
            matches!(&error, UnpackError::Corrupt { near_entry: Some(entry), .. } if entry == Path::new("big")),
            "{error}"
        );
        assert_names_entry(&error, "big");
    }

    #[test]
    fn refuses_a_tar_missing_its_end_of_archive_block() {
        let tar_bytes = TestArchive::new().file("only", 0o644, b"data").tar_bytes();
        let payload = zstd::encode_all(&tar_bytes[..1024], 3).unwrap();
        let error = assert_refused_bytes(&payload, &default_policy());
        assert!(matches!(&error, UnpackError::Corrupt { .. }), "{error}");
        assert_names_entry(&error, "only");
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

    #[test]
    fn refuses_an_oversized_long_name_before_buffering_it() {
        let huge_name = vec![b'a'; 2 * MAX_METADATA_BYTES_PER_ENTRY as usize];
        let error = assert_refused(
            TestArchive::new()
                .file("first", 0o644, b"x")
                .gnu_long_name(&huge_name)
                .file("second", 0o644, b"x"),
        );
        assert!(
            matches!(&error, UnpackError::MetadataTooLarge { near_entry: Some(entry), limit }
                if entry == Path::new("first") && *limit == MAX_METADATA_BYTES_PER_ENTRY),
            "{error}"
        );
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
    fn removes_trees_with_read_only_directories_without_following_symlinks() {
        let scratch = Scratch::new();
        let root = scratch.root.join("images/old");
        fs::create_dir_all(root.join("ro")).unwrap();
        fs::write(root.join("ro/file"), b"x").unwrap();
        fs::create_dir_all(root.join("locked/inner")).unwrap();
        fs::write(root.join("locked/inner/file"), b"x").unwrap();
        std::os::unix::fs::symlink(scratch.sentinel(), root.join("outside")).unwrap();
        fs::set_permissions(root.join("ro"), Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(root.join("locked"), Permissions::from_mode(0o000)).unwrap();
        let sentinel_before = fs::read(scratch.sentinel().join("keep.txt")).unwrap();

        remove_unpacked_tree(&root).unwrap();

        assert!(fs::symlink_metadata(&root).is_err());
        assert_eq!(
            fs::read(scratch.sentinel().join("keep.txt")).unwrap(),
            sentinel_before
        );
        assert_eq!(mode_of(&scratch.sentinel()), 0o755);
    }

    #[test]
    fn sync_tree_skips_symlinks_and_syncs_everything_else() {
        let scratch = Scratch::new();
        let archive = TestArchive::new()
            .file("bin/tool", 0o755, b"x")
            .file("secret", 0o000, b"no one may read this")
            .symlink("dangling", "nowhere")
            .directory("ro/", 0o555);
        fs::write(scratch.archive_path(), archive.compressed()).unwrap();
        unpack_payload(
            &scratch.archive_path(),
            &scratch.destination(),
            &default_policy(),
        )
        .unwrap();
        sync_tree(&scratch.destination()).unwrap();
        let missing = sync_tree(&scratch.root.join("missing")).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
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
    fn normalizes_archive_paths() {
        let normalized = |raw: &str| normalize_archive_path(raw.as_bytes());
        assert_eq!(
            normalized("./a//b/./c/").unwrap(),
            Some(PathBuf::from("a/b/c"))
        );
        assert_eq!(normalized("./").unwrap(), None);
        assert_eq!(normalized(".").unwrap(), None);
        assert!(normalized("").is_err());
        assert!(normalized("/etc/passwd").is_err());
        assert!(normalized("a/../b").is_err());
        assert!(normalized("..").is_err());
        assert!(normalize_archive_path(b"a\0b").is_err());
        assert_eq!(normalized("...").unwrap(), Some(PathBuf::from("...")));
    }

    #[test]
    fn checks_symlink_targets_lexically() {
        let check =
            |link: &str, target: &str| check_symlink_target(Path::new(link), target.as_bytes());
        assert!(check("a", "b").is_ok());
        assert!(check("a", ".").is_ok());
        assert!(check("a/b/link", "../../c/d").is_ok());
        assert!(check("a/b/link", "../..").is_ok());
        assert!(check("a/b/link", "../../..").is_err());
        assert!(check("link", "..").is_err());
        assert!(check("a/link", "b/../..").is_err());
        assert!(check("a/b/link", "c/../d").is_err());
        assert!(check("link", "/etc").is_err());
        assert!(check("link", "").is_err());
    }
}
