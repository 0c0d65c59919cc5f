//! Forensic bundles on the server: the files, and their settings. Each
//! upload is written to `<data>/forensics/<machine>/<received_at>-<quarantine>.tar`
//! through `<quarantine>.tar.partial`, created exclusively (`O_EXCL`), so that
//! two uploads for one quarantine never write at once, and published with a
//! link that never replaces an existing bundle; a listing never shows half a
//! bundle, and a bundle once stored is never overwritten.
//!
//! What must never live here: which uploads are accepted (one per quarantine,
//! the size cap, the quota) — those rules are `services::forensics`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::store::UnixSeconds;

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

/// A stored bundle. `sha256` is empty in listings (computed on download).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    pub path: PathBuf,
    pub quarantine_id: String,
    pub received_at: UnixSeconds,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct ForensicStore {
    root: PathBuf,
}

/// An upload in progress: bytes are hashed and counted as they arrive. The
/// partial file is removed when the writer is dropped unfinished (a failed
/// or cancelled upload), so that the quarantine can be uploaded again.
pub struct BundleWriter {
    file: tokio::fs::File,
    partial: PathBuf,
    target: PathBuf,
    quarantine_id: String,
    received_at: UnixSeconds,
    size: u64,
    digest: ring::digest::Context,
    finished: bool,
}

/// `<received_at>-<quarantine>.tar` → (received_at, quarantine).
fn parse_bundle_name(name: &str) -> Option<(UnixSeconds, &str)> {
    let stem = name.strip_suffix(".tar")?;
    let (received_at, quarantine_id) = stem.split_once('-')?;
    Some((received_at.parse().ok()?, quarantine_id))
}

impl ForensicStore {
    pub fn new(data_dir: &Path) -> Self {
        ForensicStore {
            root: data_dir.join("forensics"),
        }
    }

    fn machine_dir(&self, machine_id: Uuid) -> PathBuf {
        self.root.join(machine_id.to_string())
    }

    /// Starts the upload of a quarantine's bundle: refused while another
    /// upload for it runs, or once one is stored. The exclusive partial file
    /// is claimed first, then stored bundles are checked, so that two
    /// concurrent uploads cannot both pass.
    pub async fn begin(
        &self,
        machine_id: Uuid,
        quarantine_id: &str,
        received_at: UnixSeconds,
    ) -> Result<BundleWriter, ForensicsError> {
        if !flotte_proto::identity::is_valid_segment(quarantine_id) {
            return Err(ForensicsError::BadQuarantineId(quarantine_id.to_owned()));
        }
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
        let writer = BundleWriter {
            file,
            partial,
            target: directory.join(format!("{received_at:012}-{quarantine_id}.tar")),
            quarantine_id: quarantine_id.to_owned(),
            received_at,
            size: 0,
            digest: ring::digest::Context::new(&ring::digest::SHA256),
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
        Ok(writer)
    }

    /// Every complete bundle of a machine, oldest first (without digests).
    pub async fn list(&self, machine_id: Uuid) -> Result<Vec<StoredBundle>, ForensicsError> {
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
                path,
            });
        }
        bundles.sort_by(|a, b| {
            (a.received_at, &a.quarantine_id).cmp(&(b.received_at, &b.quarantine_id))
        });
        Ok(bundles)
    }

    /// The bundle of one quarantine (or the latest one), with its digest.
    pub async fn find(
        &self,
        machine_id: Uuid,
        quarantine_id: Option<&str>,
    ) -> Result<Option<StoredBundle>, ForensicsError> {
        let bundles = self.list(machine_id).await?;
        let chosen = match quarantine_id {
            Some(wanted) => bundles
                .into_iter()
                .find(|bundle| bundle.quarantine_id == wanted),
            None => bundles.into_iter().last(),
        };
        let Some(mut bundle) = chosen else {
            return Ok(None);
        };
        bundle.sha256 = sha256_of_file(&bundle.path).await?;
        Ok(Some(bundle))
    }
}

/// The file's SHA-256, read in chunks (a bundle is never held whole).
async fn sha256_of_file(path: &Path) -> Result<String, ForensicsError> {
    let mut file = tokio::fs::File::open(path).await.map_err(io_error(path))?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; HASH_READ_BYTES];
    loop {
        let read = file.read(&mut buffer).await.map_err(io_error(path))?;
        if read == 0 {
            return Ok(hex::encode(digest.finish().as_ref()));
        }
        digest.update(&buffer[..read]);
    }
}

impl BundleWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), ForensicsError> {
        self.size += bytes.len() as u64;
        self.digest.update(bytes);
        self.file
            .write_all(bytes)
            .await
            .map_err(io_error(&self.partial))
    }

    /// Makes the bundle visible; returns it. Published by a hard link, which
    /// fails rather than replace a bundle already there.
    pub async fn finish(mut self) -> Result<StoredBundle, ForensicsError> {
        self.file
            .sync_all()
            .await
            .map_err(io_error(&self.partial))?;
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
            path: self.target.clone(),
            quarantine_id: self.quarantine_id.clone(),
            received_at: self.received_at,
            size: self.size,
            sha256: hex::encode(self.digest.clone().finish().as_ref()),
        })
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: a leftover partial only blocks this quarantine's
            // upload until it is removed (it is never listed nor served).
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn temporary_store() -> (PathBuf, ForensicStore) {
        let root = std::env::temp_dir().join(format!("flotte-forensics-{}", Uuid::new_v4()));
        let store = ForensicStore::new(&root);
        (root, store)
    }

    #[tokio::test]
    async fn every_complete_bundle_is_listed_and_partial_ones_are_not() {
        let (root, store) = temporary_store();
        let machine = Uuid::new_v4();
        assert_eq!(store.find(machine, None).await.unwrap(), None);
        for (at, id, body) in [(200, "q2", b"new".as_slice()), (100, "q1", b"old")] {
            let mut writer = store.begin(machine, id, at).await.unwrap();
            writer.write(body).await.unwrap();
            writer.finish().await.unwrap();
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
        assert_eq!(listed, [(100, "q1".into(), 3), (200, "q2".into(), 3)]);
        let latest = store.find(machine, None).await.unwrap().unwrap();
        assert_eq!(latest.quarantine_id, "q2");
        assert_eq!(std::fs::read(&latest.path).unwrap(), b"new");
        let chosen = store.find(machine, Some("q1")).await.unwrap().unwrap();
        assert_eq!(std::fs::read(&chosen.path).unwrap(), b"old");
        assert_eq!(
            chosen.sha256,
            hex::encode(ring::digest::digest(&ring::digest::SHA256, b"old").as_ref())
        );
        assert!(store.begin(machine, "../x", 1).await.is_err());
        drop(unfinished);
        let _ = std::fs::remove_dir_all(root);
    }

    #[tokio::test]
    async fn a_quarantine_is_written_once_and_a_dropped_upload_leaves_nothing() {
        let (root, store) = temporary_store();
        let machine = Uuid::new_v4();
        let mut first = store.begin(machine, "q1", 100).await.unwrap();
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
        let mut cancelled = store.begin(machine, "q2", 103).await.unwrap();
        cancelled.write(b"half").await.unwrap();
        drop(cancelled);
        let names: Vec<String> =
            std::fs::read_dir(root.join("forensics").join(machine.to_string()))
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
        assert_eq!(names, ["000000000100-q1.tar"]);
        assert!(store.begin(machine, "q2", 104).await.is_ok());
        let _ = std::fs::remove_dir_all(root);
    }
}
