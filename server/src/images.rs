//! The image store on the server: payload blobs named by their SHA-256,
//! behind the [`BlobStore`] trait, written while hashing so that a blob is
//! only ever visible complete and verified. Two implementations: a
//! directory (`<data>/images/blobs/`, through a temporary file; one server
//! on SQLite) here, and chunked rows in PostgreSQL (replicas, so that any
//! replica serves any download) in `store::postgres::blobs`.
//!
//! Signature checks happen before any byte is accepted (see
//! `services::images`); this module only keeps bytes and proves their digest.

use std::path::{Path, PathBuf};

use ring::digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

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
    #[error("blob database error: {0}")]
    Database(String),
}

impl BlobError {
    /// Whether the blob store's disk is full (`ENOSPC`, `EDQUOT`): nothing
    /// was kept, and the same push works once space is freed.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, BlobError::Io { source, .. } if io_error_is_disk_full(source))
    }
}

/// Whether a file-system error says the disk (or the user's quota) is full:
/// the operator's to fix, and a retry works once space is freed.
pub fn io_error_is_disk_full(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT)
}

/// Where image payloads are kept.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Starts receiving a blob of `expected_size` bytes.
    async fn begin(&self, expected_size: u64) -> Result<Box<dyn BlobWriter>, BlobError>;
    /// The size of the stored blob `digest`, if there is one.
    async fn size(&self, digest: &str) -> Result<Option<u64>, BlobError>;
    /// Up to `limit` bytes of blob `digest` from `offset` (fewer only at
    /// its end; none past it).
    async fn read_at(&self, digest: &str, offset: u64, limit: usize) -> Result<Vec<u8>, BlobError>;
}

/// A blob being received; visible only once [`BlobWriter::finish`] proved
/// its size and digest.
#[async_trait::async_trait]
pub trait BlobWriter: Send {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError>;
    /// Checks size and digest, then makes the blob visible.
    async fn finish(self: Box<Self>, expected_digest: &str) -> Result<(), BlobError>;
    /// Drops an unfinished blob.
    async fn abandon(self: Box<Self>);
}

/// Counts and hashes a blob's bytes as they arrive, refusing more than its
/// declared size; shared by every [`BlobWriter`].
pub struct BlobCheck {
    hasher: digest::Context,
    written: u64,
    expected_size: u64,
}

impl BlobCheck {
    pub fn new(expected_size: u64) -> Self {
        BlobCheck {
            hasher: digest::Context::new(&digest::SHA256),
            written: 0,
            expected_size,
        }
    }

    /// Accounts for `bytes`, refusing them past the declared size.
    pub fn add(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        if self.written + bytes.len() as u64 > self.expected_size {
            return Err(BlobError::TooLarge {
                expected: self.expected_size,
            });
        }
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Whether everything declared arrived, with the declared digest.
    pub fn verify(&self, expected_digest: &str) -> Result<(), BlobError> {
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
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }
}

/// Blobs as files in a directory of the data dir.
#[derive(Debug, Clone)]
pub struct DirectoryBlobStore {
    root: PathBuf,
}

/// A blob being received into a temporary file.
pub struct DirectoryBlobWriter {
    root: PathBuf,
    temporary: PathBuf,
    file: tokio::fs::File,
    check: BlobCheck,
}

impl DirectoryBlobStore {
    pub fn new(data_dir: &Path) -> Self {
        DirectoryBlobStore {
            root: data_dir.join("images"),
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
        move |source| BlobError::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs").join(digest)
    }
}

#[async_trait::async_trait]
impl BlobStore for DirectoryBlobStore {
    async fn begin(&self, expected_size: u64) -> Result<Box<dyn BlobWriter>, BlobError> {
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
        Ok(Box::new(DirectoryBlobWriter {
            root: self.root.clone(),
            temporary,
            file,
            check: BlobCheck::new(expected_size),
        }))
    }

    async fn size(&self, digest: &str) -> Result<Option<u64>, BlobError> {
        let path = self.blob_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(metadata) => Ok(Some(metadata.len())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(Self::io(&path)(error)),
        }
    }

    async fn read_at(&self, digest: &str, offset: u64, limit: usize) -> Result<Vec<u8>, BlobError> {
        let path = self.blob_path(digest);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(Self::io(&path))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(Self::io(&path))?;
        let mut buffer = Vec::with_capacity(limit);
        (&mut file)
            .take(limit as u64)
            .read_to_end(&mut buffer)
            .await
            .map_err(Self::io(&path))?;
        Ok(buffer)
    }
}

impl DirectoryBlobWriter {
    async fn verify_and_place(&mut self, expected_digest: &str) -> Result<(), BlobError> {
        self.check.verify(expected_digest)?;
        self.file
            .sync_all()
            .await
            .map_err(DirectoryBlobStore::io(&self.temporary))?;
        let destination = self.root.join("blobs").join(expected_digest);
        tokio::fs::rename(&self.temporary, &destination)
            .await
            .map_err(DirectoryBlobStore::io(&destination))
    }
}

#[async_trait::async_trait]
impl BlobWriter for DirectoryBlobWriter {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        self.check.add(bytes)?;
        self.file
            .write_all(bytes)
            .await
            .map_err(DirectoryBlobStore::io(&self.temporary))
    }

    async fn finish(mut self: Box<Self>, expected_digest: &str) -> Result<(), BlobError> {
        let result = self.verify_and_place(expected_digest).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&self.temporary).await;
        }
        result
    }

    async fn abandon(self: Box<Self>) {
        let _ = tokio::fs::remove_file(&self.temporary).await;
    }
}

/// What every [`BlobStore`] must do, run by each implementation's tests.
#[cfg(test)]
pub(crate) mod contract {
    use super::*;

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(digest::digest(&digest::SHA256, bytes))
    }

    pub(crate) async fn blobs_are_visible_only_whole_and_verified(store: &dyn BlobStore) {
        // 2.5 MiB: several PostgreSQL chunks, written in uneven pieces.
        let payload: Vec<u8> = (0..2_621_440u32).map(|index| (index % 251) as u8).collect();
        let digest = sha256_hex(&payload);
        let mut writer = store.begin(payload.len() as u64).await.unwrap();
        for piece in payload.chunks(300_007) {
            writer.write(piece).await.unwrap();
        }
        assert_eq!(
            store.size(&digest).await.unwrap(),
            None,
            "not before finish"
        );
        writer.finish(&digest).await.unwrap();
        assert_eq!(
            store.size(&digest).await.unwrap(),
            Some(payload.len() as u64)
        );
        for (offset, limit) in [
            (0usize, 1000usize),
            (1_048_576 - 10, 20),
            (1_000_000, 262_144),
            (payload.len() - 5, 100),
        ] {
            let read = store.read_at(&digest, offset as u64, limit).await.unwrap();
            let end = payload.len().min(offset + limit);
            assert_eq!(read, payload[offset..end], "at {offset} for {limit}");
        }
        let past_end = store
            .read_at(&digest, payload.len() as u64, 10)
            .await
            .unwrap();
        assert!(past_end.is_empty());

        // Too many bytes, too few, the wrong digest: refused, nothing visible.
        let mut writer = store.begin(4).await.unwrap();
        assert!(matches!(
            writer.write(b"12345").await,
            Err(BlobError::TooLarge { expected: 4 })
        ));
        writer.abandon().await;
        let mut writer = store.begin(4).await.unwrap();
        writer.write(b"123").await.unwrap();
        let short = writer.finish(&sha256_hex(b"123")).await;
        assert!(
            matches!(short, Err(BlobError::SizeMismatch { .. })),
            "{short:?}"
        );
        let mut writer = store.begin(4).await.unwrap();
        writer.write(b"1234").await.unwrap();
        let wrong = writer.finish(&sha256_hex(b"abcd")).await;
        assert!(
            matches!(wrong, Err(BlobError::DigestMismatch { .. })),
            "{wrong:?}"
        );
        assert_eq!(store.size(&sha256_hex(b"1234")).await.unwrap(), None);
        assert_eq!(store.size(&sha256_hex(b"abcd")).await.unwrap(), None);

        // The same payload received twice (two replicas): one blob, whole.
        let mut again = store.begin(payload.len() as u64).await.unwrap();
        again.write(&payload).await.unwrap();
        again.finish(&digest).await.unwrap();
        let tail = store
            .read_at(&digest, payload.len() as u64 - 3, 3)
            .await
            .unwrap();
        assert_eq!(tail, payload[payload.len() - 3..]);
    }

    #[tokio::test]
    async fn a_directory_keeps_blobs_whole_and_verified() {
        let directory = crate::store::TemporaryDirectory::new();
        let store = DirectoryBlobStore::new(&directory.0);
        blobs_are_visible_only_whole_and_verified(&store).await;
        let incoming = std::fs::read_dir(directory.0.join("images/incoming"))
            .unwrap()
            .count();
        assert_eq!(incoming, 0, "refused and abandoned blobs leave no file");
    }
}
