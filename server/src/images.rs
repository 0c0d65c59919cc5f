//! The image store on the server: payload blobs named by their SHA-256 in
//! `<data>/images/blobs/`, written through a temporary file while hashing so
//! that a blob is only ever visible complete and verified.
//!
//! Signature checks happen before any byte is accepted (see `api::images`);
//! this module only keeps bytes and proves their digest.

use std::path::{Path, PathBuf};

use ring::digest;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the payload is larger than the {expected} bytes its manifest declares")]
    TooLarge { expected: u64 },
    #[error("the payload is {actual} bytes, its manifest declares {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("the payload's SHA-256 is {actual}, its manifest declares {expected}")]
    DigestMismatch { expected: String, actual: String },
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// A blob being received; becomes visible only through [`BlobWriter::finish`].
pub struct BlobWriter {
    temporary: PathBuf,
    file: tokio::fs::File,
    hasher: digest::Context,
    written: u64,
    expected_size: u64,
}

impl BlobStore {
    pub fn new(data_dir: &Path) -> Self {
        BlobStore {
            root: data_dir.join("images"),
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
        move |source| BlobError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs").join(digest)
    }

    pub async fn begin(&self, expected_size: u64) -> Result<BlobWriter, BlobError> {
        let incoming = self.root.join("incoming");
        tokio::fs::create_dir_all(&incoming)
            .await
            .map_err(Self::io(&incoming))?;
        tokio::fs::create_dir_all(self.root.join("blobs"))
            .await
            .map_err(Self::io(&self.root))?;
        let temporary = incoming.join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::File::create(&temporary)
            .await
            .map_err(Self::io(&temporary))?;
        Ok(BlobWriter {
            temporary,
            file,
            hasher: digest::Context::new(&digest::SHA256),
            written: 0,
            expected_size,
        })
    }
}

impl BlobWriter {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        if self.written + bytes.len() as u64 > self.expected_size {
            return Err(BlobError::TooLarge {
                expected: self.expected_size,
            });
        }
        self.file
            .write_all(bytes)
            .await
            .map_err(BlobStore::io(&self.temporary))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Checks size and digest, then moves the blob into place.
    pub async fn finish(
        mut self,
        store: &BlobStore,
        expected_digest: &str,
    ) -> Result<(), BlobError> {
        let result = self.verify_and_place(store, expected_digest).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&self.temporary).await;
        }
        result
    }

    async fn verify_and_place(
        &mut self,
        store: &BlobStore,
        expected_digest: &str,
    ) -> Result<(), BlobError> {
        if self.written != self.expected_size {
            return Err(BlobError::SizeMismatch {
                expected: self.expected_size,
                actual: self.written,
            });
        }
        let actual = hex::encode(self.hasher.clone().finish());
        if actual != expected_digest {
            return Err(BlobError::DigestMismatch {
                expected: expected_digest.to_owned(),
                actual,
            });
        }
        self.file
            .sync_all()
            .await
            .map_err(BlobStore::io(&self.temporary))?;
        let destination = store.blob_path(expected_digest);
        tokio::fs::rename(&self.temporary, &destination)
            .await
            .map_err(BlobStore::io(&destination))
    }

    /// Drops an unfinished blob.
    pub async fn abandon(self) {
        let _ = tokio::fs::remove_file(&self.temporary).await;
    }
}
