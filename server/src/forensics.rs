//! Forensic bundles on the server: where their bytes live, behind the
//! [`ForensicStore`] trait, and their settings. Two implementations: a
//! directory of the data dir here ([`DirectoryForensicStore`], one server
//! on SQLite), and chunked rows in PostgreSQL (replicas, so that a bundle
//! uploaded through one replica is served by every other) in
//! `store::postgres::forensics`. Every implementation keeps the same rules,
//! proved by the [`contract`] suite run on both:
//!
//! * one upload at a time per quarantine (a second is refused while the
//!   first runs), and one bundle per quarantine, never overwritten;
//! * a bundle is visible only whole: listings never show half of one, and
//!   its size and SHA-256 are proved against what was received before it
//!   is;
//! * an upload dropped unfinished (refused, failed, cancelled) leaves
//!   nothing behind, so that the quarantine can be uploaded again.
//!
//! The directory writes `<data>/forensics/<machine>/<received_at>-<quarantine>.tar`
//! through `<quarantine>.tar.partial`, created exclusively (`O_EXCL`), and
//! publishes it with a link that never replaces an existing bundle.
//!
//! What must never live here: which uploads are accepted (one per quarantine,
//! the size cap, the quota) — those rules are `services::forensics`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use uuid::Uuid;

use crate::store::{StoreError, UnixSeconds};

/// Default for `[forensics] max_bundle_bytes` (the agent bounds each part
/// well below this).
pub const DEFAULT_MAX_BUNDLE_BYTES: u64 = 32 * 1024 * 1024;
/// Default for `[forensics] machine_quota_bytes`: a few bundles per machine.
pub const DEFAULT_MACHINE_QUOTA_BYTES: u64 = 128 * 1024 * 1024;
/// Suffix of an upload in progress (skipped by listings and backups).
const PARTIAL_SUFFIX: &str = ".tar.partial";
/// Bytes read at a time when hashing a stored bundle.
const HASH_READ_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ForensicsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("quarantine id {} is not a plain name", flotte_proto::names::quoted_prefix(.0))]
    BadQuarantineId(String),
    #[error("an upload for quarantine {0} is already in progress")]
    UploadInProgress(String),
    #[error("a forensic bundle for quarantine {0} is already stored")]
    AlreadyStored(String),
    #[error("forensic bundle of quarantine {quarantine_id}: {received_size} bytes with SHA-256 {received_sha256} were received, but {stored_size} bytes with SHA-256 {stored_sha256} were stored; it is not kept")]
    StoredDiffers {
        quarantine_id: String,
        received_size: u64,
        received_sha256: String,
        stored_size: u64,
        stored_sha256: String,
    },
    #[error("forensic bundle store: {0}")]
    Store(#[from] StoreError),
}

impl ForensicsError {
    /// Whether the bundle directory's disk is full: nothing was kept, and
    /// the agent's upload works once space is freed.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, ForensicsError::Io { source, .. } if crate::images::io_error_is_disk_full(source))
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ForensicsError + '_ {
    move |source| ForensicsError::Io {
        path: path.to_owned(),
        source,
    }
}
/// The `[forensics]` table of `server.toml`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ForensicsConfigFile {
    /// Largest bundle accepted; an upload is refused as soon as it passes this.
    pub max_bundle_bytes: u64,
    /// Bytes of bundles kept per machine, over all its quarantines; an upload
    /// that would pass it is refused (remove old bundles by hand to make room).
    pub machine_quota_bytes: u64,
}

impl Default for ForensicsConfigFile {
    fn default() -> Self {
        ForensicsConfigFile {
            max_bundle_bytes: DEFAULT_MAX_BUNDLE_BYTES,
            machine_quota_bytes: DEFAULT_MACHINE_QUOTA_BYTES,
        }
    }
}

/// Validated `[forensics]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForensicsLimits {
    pub max_bundle_bytes: u64,
    pub machine_quota_bytes: u64,
}

impl ForensicsConfigFile {
    pub fn is_default(&self) -> bool {
        *self == ForensicsConfigFile::default()
    }

    /// Adds every problem to `problems`.
    pub fn validate(&self, problems: &mut Vec<String>) -> ForensicsLimits {
        if self.max_bundle_bytes == 0 {
            problems.push("forensics.max_bundle_bytes must be at least 1".to_owned());
        }
        if self.machine_quota_bytes < self.max_bundle_bytes {
            problems.push(format!(
                "forensics.machine_quota_bytes ({}) must be at least forensics.max_bundle_bytes ({})",
                self.machine_quota_bytes, self.max_bundle_bytes
            ));
        }
        ForensicsLimits {
            max_bundle_bytes: self.max_bundle_bytes,
            machine_quota_bytes: self.machine_quota_bytes,
        }
    }
}

/// A stored bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    pub quarantine_id: String,
    pub received_at: UnixSeconds,
    pub size: u64,
    /// Hex SHA-256. Always set by `find` and `finish`; a listing may leave
    /// it empty when the store computes it only on demand (the directory).
    pub sha256: String,
    /// Where the store that listed it keeps the bytes (a file name, an
    /// upload id); read only by that store's [`ForensicStore::read_at`].
    pub location: String,
}

/// Where forensic bundles are kept.
#[async_trait::async_trait]
pub trait ForensicStore: Send + Sync + 'static {
    /// Starts the upload of a quarantine's bundle: refused while another
    /// upload for it runs, or once one is stored.
    async fn begin(
        &self,
        machine_id: Uuid,
        quarantine_id: &str,
        received_at: UnixSeconds,
    ) -> Result<Box<dyn BundleWriter>, ForensicsError>;
    /// Every complete bundle of a machine, oldest first.
    async fn list(&self, machine_id: Uuid) -> Result<Vec<StoredBundle>, ForensicsError>;
    /// The bundle of one quarantine (or the latest one), with its digest
    /// (as listed, for a store whose listings carry digests).
    async fn find(
        &self,
        machine_id: Uuid,
        quarantine_id: Option<&str>,
    ) -> Result<Option<StoredBundle>, ForensicsError> {
        Ok(choose_bundle(self.list(machine_id).await?, quarantine_id))
    }
    /// Up to `limit` bytes of `bundle` (as this store listed it) from
    /// `offset`; fewer only at its end, none past it.
    async fn read_at(
        &self,
        machine_id: Uuid,
        bundle: &StoredBundle,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<u8>, ForensicsError>;
}

/// An upload in progress. Dropped unfinished, it removes what it wrote
/// (for a cancelled call); [`BundleWriter::abandon`] does so before it
/// returns.
#[async_trait::async_trait]
pub trait BundleWriter: Send {
    /// Bytes written so far.
    fn size(&self) -> u64;
    async fn write(&mut self, bytes: &[u8]) -> Result<(), ForensicsError>;
    /// Proves the stored size and digest, then makes the bundle visible;
    /// fails (leaving nothing) if one for the quarantine appeared meanwhile.
    async fn finish(self: Box<Self>) -> Result<StoredBundle, ForensicsError>;
    /// Removes what was written, and the claim on the quarantine.
    async fn abandon(self: Box<Self>);
}

/// Counts and hashes a bundle's bytes as they arrive; shared by every
/// [`BundleWriter`].
pub(crate) struct ReceivedBundle {
    size: u64,
    digest: ring::digest::Context,
}

impl ReceivedBundle {
    pub(crate) fn new() -> Self {
        ReceivedBundle {
            size: 0,
            digest: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    pub(crate) fn add(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        self.digest.update(bytes);
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn sha256(&self) -> String {
        hex::encode(self.digest.clone().finish().as_ref())
    }
}

/// Refuses a quarantine id that is not a plain name (it names a file, a row).
pub(crate) fn check_quarantine_id(quarantine_id: &str) -> Result<(), ForensicsError> {
    if flotte_proto::identity::is_valid_segment(quarantine_id) {
        Ok(())
    } else {
        Err(ForensicsError::BadQuarantineId(quarantine_id.to_owned()))
    }
}

/// The bundle of `quarantine_id` among `bundles` (oldest first), or the
/// latest one.
fn choose_bundle(bundles: Vec<StoredBundle>, quarantine_id: Option<&str>) -> Option<StoredBundle> {
    match quarantine_id {
        Some(wanted) => bundles
            .into_iter()
            .find(|bundle| bundle.quarantine_id == wanted),
        None => bundles.into_iter().last(),
    }
}

/// Bundles as files in the data dir (one server on SQLite).
#[derive(Debug, Clone)]
pub struct DirectoryForensicStore {
    root: PathBuf,
}

/// An upload into a partial file, removed when the writer is dropped
/// unfinished.
struct DirectoryBundleWriter {
    file: tokio::fs::File,
    partial: PathBuf,
    target: PathBuf,
    quarantine_id: String,
    received_at: UnixSeconds,
    received: ReceivedBundle,
    finished: bool,
}

/// `<received_at>-<quarantine>.tar` → (received_at, quarantine).
fn parse_bundle_name(name: &str) -> Option<(UnixSeconds, &str)> {
    let stem = name.strip_suffix(".tar")?;
    let (received_at, quarantine_id) = stem.split_once('-')?;
    Some((received_at.parse().ok()?, quarantine_id))
}

impl DirectoryForensicStore {
    pub fn new(data_dir: &Path) -> Self {
        DirectoryForensicStore {
            root: data_dir.join("forensics"),
        }
    }

    fn machine_dir(&self, machine_id: Uuid) -> PathBuf {
        self.root.join(machine_id.to_string())
    }
}

#[async_trait::async_trait]
impl ForensicStore for DirectoryForensicStore {
    /// The exclusive partial file is claimed first, then stored bundles are
    /// checked, so that two concurrent uploads cannot both pass.
    async fn begin(
        &self,
        machine_id: Uuid,
        quarantine_id: &str,
        received_at: UnixSeconds,
    ) -> Result<Box<dyn BundleWriter>, ForensicsError> {
        check_quarantine_id(quarantine_id)?;
        let directory = self.machine_dir(machine_id);
        tokio::fs::create_dir_all(&directory)
            .await
            .map_err(io_error(&directory))?;
        let partial = directory.join(format!("{quarantine_id}{PARTIAL_SUFFIX}"));
        let file = match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .await
        {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ForensicsError::UploadInProgress(quarantine_id.to_owned()))
            }
            Err(error) => return Err(io_error(&partial)(error)),
        };
        let writer = DirectoryBundleWriter {
            file,
            partial,
            target: directory.join(format!("{received_at:012}-{quarantine_id}.tar")),
            quarantine_id: quarantine_id.to_owned(),
            received_at,
            received: ReceivedBundle::new(),
            finished: false,
        };
        // Dropping `writer` on any error below removes the claim.
        if self
            .list(machine_id)
            .await?
            .iter()
            .any(|bundle| bundle.quarantine_id == quarantine_id)
        {
            return Err(ForensicsError::AlreadyStored(quarantine_id.to_owned()));
        }
        Ok(Box::new(writer))
    }

    /// Without digests (`find` computes the chosen one's).
    async fn list(&self, machine_id: Uuid) -> Result<Vec<StoredBundle>, ForensicsError> {
        let directory = self.machine_dir(machine_id);
        let mut entries = match tokio::fs::read_dir(&directory).await {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_error(&directory)(error)),
        };
        let mut bundles = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(io_error(&directory))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((received_at, quarantine_id)) = parse_bundle_name(&name) else {
                continue;
            };
            let path = entry.path();
            let metadata = tokio::fs::symlink_metadata(&path)
                .await
                .map_err(io_error(&path))?;
            if !metadata.is_file() {
                continue;
            }
            bundles.push(StoredBundle {
                quarantine_id: quarantine_id.to_owned(),
                received_at,
                size: metadata.len(),
                sha256: String::new(),
                location: name,
            });
        }
        bundles.sort_by(|a, b| {
            (a.received_at, &a.quarantine_id).cmp(&(b.received_at, &b.quarantine_id))
        });
        Ok(bundles)
    }

    async fn find(
        &self,
        machine_id: Uuid,
        quarantine_id: Option<&str>,
    ) -> Result<Option<StoredBundle>, ForensicsError> {
        let Some(mut bundle) = choose_bundle(self.list(machine_id).await?, quarantine_id) else {
            return Ok(None);
        };
        bundle.sha256 =
            sha256_of_file(&self.machine_dir(machine_id).join(&bundle.location)).await?;
        Ok(Some(bundle))
    }

    async fn read_at(
        &self,
        machine_id: Uuid,
        bundle: &StoredBundle,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<u8>, ForensicsError> {
        // The location is a name this store listed, never a path of the caller's.
        if parse_bundle_name(&bundle.location).is_none() || bundle.location.contains('/') {
            return Err(ForensicsError::BadQuarantineId(bundle.location.clone()));
        }
        let path = self.machine_dir(machine_id).join(&bundle.location);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(io_error(&path))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io_error(&path))?;
        let mut buffer = Vec::with_capacity(limit);
        (&mut file)
            .take(limit as u64)
            .read_to_end(&mut buffer)
            .await
            .map_err(io_error(&path))?;
        Ok(buffer)
    }
}

/// The file's SHA-256, read in chunks (a bundle is never held whole).
async fn sha256_of_file(path: &Path) -> Result<String, ForensicsError> {
    let mut file = tokio::fs::File::open(path).await.map_err(io_error(path))?;
    let mut received = ReceivedBundle::new();
    let mut buffer = vec![0u8; HASH_READ_BYTES];
    loop {
        let read = file.read(&mut buffer).await.map_err(io_error(path))?;
        if read == 0 {
            return Ok(received.sha256());
        }
        received.add(&buffer[..read]);
    }
}

#[async_trait::async_trait]
impl BundleWriter for DirectoryBundleWriter {
    fn size(&self) -> u64 {
        self.received.size()
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ForensicsError> {
        self.received.add(bytes);
        self.file
            .write_all(bytes)
            .await
            .map_err(io_error(&self.partial))
    }

    /// Published by a hard link, which fails rather than replace a bundle
    /// already there; the partial file's length is the proof of size, and
    /// the digest is of the bytes written to it.
    async fn finish(mut self: Box<Self>) -> Result<StoredBundle, ForensicsError> {
        self.file
            .sync_all()
            .await
            .map_err(io_error(&self.partial))?;
        let written = tokio::fs::metadata(&self.partial)
            .await
            .map_err(io_error(&self.partial))?
            .len();
        if written != self.received.size() {
            return Err(ForensicsError::StoredDiffers {
                quarantine_id: self.quarantine_id.clone(),
                received_size: self.received.size(),
                received_sha256: self.received.sha256(),
                stored_size: written,
                stored_sha256: sha256_of_file(&self.partial).await?,
            });
        }
        match tokio::fs::hard_link(&self.partial, &self.target).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ForensicsError::AlreadyStored(self.quarantine_id.clone()))
            }
            Err(error) => return Err(io_error(&self.target)(error)),
        }
        self.finished = true;
        let _ = tokio::fs::remove_file(&self.partial).await;
        Ok(StoredBundle {
            quarantine_id: self.quarantine_id.clone(),
            received_at: self.received_at,
            size: self.received.size(),
            sha256: self.received.sha256(),
            location: self
                .target
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
    }

    async fn abandon(self: Box<Self>) {
        // Dropping removes the partial file.
    }
}

impl Drop for DirectoryBundleWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: a leftover partial only blocks this quarantine's
            // upload until it is removed (it is never listed nor served).
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// What every [`ForensicStore`] must do, run by each implementation's tests.
#[cfg(test)]
pub(crate) mod contract {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    }

    /// The whole bundle, read in uneven pieces through `read_at`.
    async fn read_whole(
        store: &dyn ForensicStore,
        machine: Uuid,
        bundle: &StoredBundle,
    ) -> Vec<u8> {
        let mut bytes = Vec::new();
        loop {
            let piece = store
                .read_at(machine, bundle, bytes.len() as u64, 300_007)
                .await
                .unwrap();
            if piece.is_empty() {
                return bytes;
            }
            bytes.extend_from_slice(&piece);
        }
    }

    pub(crate) async fn every_complete_bundle_is_listed_and_partial_ones_are_not(
        store: &dyn ForensicStore,
    ) {
        let machine = Uuid::new_v4();
        assert_eq!(store.find(machine, None).await.unwrap(), None);
        // 2.5 MiB: several PostgreSQL chunks, written in uneven pieces.
        let big: Vec<u8> = (0..2_621_440u32).map(|index| (index % 251) as u8).collect();
        for (at, id, body) in [(200, "q2", big.as_slice()), (100, "q1", b"old")] {
            let mut writer = store.begin(machine, id, at).await.unwrap();
            for piece in body.chunks(300_007) {
                writer.write(piece).await.unwrap();
            }
            assert_eq!(writer.size(), body.len() as u64);
            let stored = writer.finish().await.unwrap();
            assert_eq!(
                (stored.size, stored.sha256),
                (body.len() as u64, sha256_hex(body))
            );
        }
        let mut unfinished = store.begin(machine, "q3", 300).await.unwrap();
        unfinished.write(b"half").await.unwrap();
        let listed: Vec<(UnixSeconds, String, u64)> = store
            .list(machine)
            .await
            .unwrap()
            .into_iter()
            .map(|bundle| (bundle.received_at, bundle.quarantine_id, bundle.size))
            .collect();
        assert_eq!(
            listed,
            [(100, "q1".into(), 3), (200, "q2".into(), big.len() as u64)]
        );
        assert_eq!(store.list(Uuid::new_v4()).await.unwrap(), []);
        let latest = store.find(machine, None).await.unwrap().unwrap();
        assert_eq!(latest.quarantine_id, "q2");
        assert_eq!(latest.sha256, sha256_hex(&big));
        assert_eq!(read_whole(store, machine, &latest).await, big);
        let tail = store
            .read_at(machine, &latest, big.len() as u64 - 3, 100)
            .await
            .unwrap();
        assert_eq!(tail, big[big.len() - 3..]);
        let chosen = store.find(machine, Some("q1")).await.unwrap().unwrap();
        assert_eq!(read_whole(store, machine, &chosen).await, b"old");
        assert_eq!(chosen.sha256, sha256_hex(b"old"));
        assert_eq!(store.find(machine, Some("q9")).await.unwrap(), None);
        assert!(matches!(
            store.begin(machine, "../x", 1).await,
            Err(ForensicsError::BadQuarantineId(_))
        ));
        unfinished.abandon().await;
    }

    pub(crate) async fn a_quarantine_is_written_once_and_an_abandoned_upload_leaves_nothing(
        store: &dyn ForensicStore,
    ) {
        let machine = Uuid::new_v4();
        let mut first = store.begin(machine, "q1", 100).await.unwrap();
        // A second upload (through this replica or another) while it runs.
        assert!(matches!(
            store.begin(machine, "q1", 101).await,
            Err(ForensicsError::UploadInProgress(_))
        ));
        first.write(b"genuine").await.unwrap();
        first.finish().await.unwrap();
        assert!(matches!(
            store.begin(machine, "q1", 102).await,
            Err(ForensicsError::AlreadyStored(_))
        ));
        let served = store.find(machine, Some("q1")).await.unwrap().unwrap();
        assert_eq!(read_whole(store, machine, &served).await, b"genuine");
        let mut cancelled = store.begin(machine, "q2", 103).await.unwrap();
        cancelled.write(b"half").await.unwrap();
        cancelled.abandon().await;
        let names: Vec<String> = store
            .list(machine)
            .await
            .unwrap()
            .into_iter()
            .map(|bundle| bundle.quarantine_id)
            .collect();
        assert_eq!(names, ["q1"]);
        // The abandoned quarantine can be uploaded again.
        let mut again = store.begin(machine, "q2", 104).await.unwrap();
        again.write(b"retried").await.unwrap();
        again.finish().await.unwrap();
        let retried = store.find(machine, Some("q2")).await.unwrap().unwrap();
        assert_eq!((retried.received_at, retried.size), (104, 7));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::TemporaryDirectory;

    #[tokio::test]
    async fn a_directory_lists_complete_bundles_only() {
        let directory = TemporaryDirectory::new();
        let store = DirectoryForensicStore::new(&directory.0);
        contract::every_complete_bundle_is_listed_and_partial_ones_are_not(&store).await;
    }

    #[tokio::test]
    async fn a_directory_writes_a_quarantine_once_and_keeps_no_partial_file() {
        let directory = TemporaryDirectory::new();
        let store = DirectoryForensicStore::new(&directory.0);
        contract::a_quarantine_is_written_once_and_an_abandoned_upload_leaves_nothing(&store).await;
        let machines: Vec<PathBuf> = std::fs::read_dir(directory.0.join("forensics"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        let [machine] = machines.as_slice() else {
            panic!("{machines:?}");
        };
        let mut names: Vec<String> = std::fs::read_dir(machine)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["000000000100-q1.tar", "000000000104-q2.tar"]);
    }

    #[tokio::test]
    async fn a_dropped_directory_upload_removes_its_partial_file() {
        let directory = TemporaryDirectory::new();
        let store = DirectoryForensicStore::new(&directory.0);
        let machine = Uuid::new_v4();
        let mut dropped = store.begin(machine, "q1", 1).await.unwrap();
        dropped.write(b"half").await.unwrap();
        drop(dropped);
        let left = std::fs::read_dir(directory.0.join("forensics").join(machine.to_string()))
            .unwrap()
            .count();
        assert_eq!(left, 0);
        assert!(store.begin(machine, "q1", 2).await.is_ok());
    }
}
