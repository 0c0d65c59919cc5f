//! Forensic bundles on the server: each upload is written to
//! `<data>/forensics/<machine>/<received_at>-<quarantine>.tar` through a
//! `.partial` file renamed only when complete and within the size bound, so
//! a listing never shows half a bundle.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::store::UnixSeconds;

/// Largest bundle accepted (the agent bounds each part well below this).
pub const MAX_BUNDLE_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ForensicsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("forensic bundle larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
    #[error("quarantine id {0:?} is not a plain name")]
    BadQuarantineId(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ForensicsError + '_ {
    move |source| ForensicsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A stored bundle.
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

/// An upload in progress: bytes are hashed and counted as they arrive.
pub struct BundleWriter {
    file: tokio::fs::File,
    partial: PathBuf,
    target: PathBuf,
    quarantine_id: String,
    received_at: UnixSeconds,
    size: u64,
    digest: ring::digest::Context,
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
        let name = format!("{received_at:012}-{quarantine_id}.tar");
        let target = directory.join(&name);
        let partial = directory.join(format!("{name}.partial"));
        let file = tokio::fs::File::create(&partial)
            .await
            .map_err(io_error(&partial))?;
        Ok(BundleWriter {
            file,
            partial,
            target,
            quarantine_id: quarantine_id.to_owned(),
            received_at,
            size: 0,
            digest: ring::digest::Context::new(&ring::digest::SHA256),
        })
    }

    /// The latest complete bundle of a machine.
    pub async fn latest(&self, machine_id: Uuid) -> Result<Option<StoredBundle>, ForensicsError> {
        let directory = self.machine_dir(machine_id);
        let mut entries = match tokio::fs::read_dir(&directory).await {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io_error(&directory)(error)),
        };
        let mut latest: Option<String> = None;
        while let Some(entry) = entries.next_entry().await.map_err(io_error(&directory))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Zero-padded times: the greatest name is the newest bundle.
            if name.ends_with(".tar") && latest.as_ref().is_none_or(|best| name > *best) {
                latest = Some(name);
            }
        }
        let Some(name) = latest else {
            return Ok(None);
        };
        let path = directory.join(&name);
        let bytes = tokio::fs::read(&path).await.map_err(io_error(&path))?;
        let stem = name.trim_end_matches(".tar");
        let (received_at, quarantine_id) = stem.split_once('-').unwrap_or((stem, ""));
        Ok(Some(StoredBundle {
            quarantine_id: quarantine_id.to_owned(),
            received_at: received_at.parse().unwrap_or(0),
            size: bytes.len() as u64,
            sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref()),
            path,
        }))
    }
}

impl BundleWriter {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), ForensicsError> {
        self.size += bytes.len() as u64;
        if self.size > MAX_BUNDLE_BYTES {
            return Err(ForensicsError::TooLarge);
        }
        self.digest.update(bytes);
        self.file
            .write_all(bytes)
            .await
            .map_err(io_error(&self.partial))
    }

    /// Makes the bundle visible; returns it.
    pub async fn finish(self) -> Result<StoredBundle, ForensicsError> {
        self.file
            .sync_all()
            .await
            .map_err(io_error(&self.partial))?;
        tokio::fs::rename(&self.partial, &self.target)
            .await
            .map_err(io_error(&self.target))?;
        Ok(StoredBundle {
            path: self.target,
            quarantine_id: self.quarantine_id,
            received_at: self.received_at,
            size: self.size,
            sha256: hex::encode(self.digest.finish().as_ref()),
        })
    }

    /// Drops a failed upload.
    pub async fn abandon(self) {
        let _ = tokio::fs::remove_file(&self.partial).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_latest_complete_bundle_is_found_and_partial_ones_are_not() {
        let root = std::env::temp_dir().join(format!("flotte-forensics-{}", Uuid::new_v4()));
        let store = ForensicStore::new(&root);
        let machine = Uuid::new_v4();
        assert_eq!(store.latest(machine).await.unwrap(), None);
        for (at, id, body) in [(100, "q1", b"old".as_slice()), (200, "q2", b"new")] {
            let mut writer = store.begin(machine, id, at).await.unwrap();
            writer.write(body).await.unwrap();
            writer.finish().await.unwrap();
        }
        let mut unfinished = store.begin(machine, "q3", 300).await.unwrap();
        unfinished.write(b"half").await.unwrap();
        let latest = store.latest(machine).await.unwrap().unwrap();
        assert_eq!(
            (latest.received_at, latest.quarantine_id.as_str()),
            (200, "q2")
        );
        assert_eq!(std::fs::read(&latest.path).unwrap(), b"new");
        unfinished.abandon().await;
        assert!(store.begin(machine, "../x", 1).await.is_err());
        let _ = std::fs::remove_dir_all(root);
    }
}
