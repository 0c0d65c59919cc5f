//! Image payloads in PostgreSQL, so that every replica serves every
//! download: [`BlobStore`] over the `blob_chunks` and `blobs` tables. A
//! blob is written as chunks of [`CHUNK_BYTES`] under a fresh upload id and
//! becomes visible only when its `blobs` row is inserted, after its size
//! and digest were checked; two replicas receiving the same payload at once
//! keep one (the other's chunks are deleted). Reads take byte ranges out of
//! the chunks (`substring`), so a resumed download costs what it reads.

use uuid::Uuid;

use super::PostgresStore;
use crate::images::{BlobCheck, BlobError, BlobStore, BlobWriter};
use crate::store::StoreError;

/// Bytes per stored chunk: big enough that a 1 GB image is a thousand
/// rows, small enough that one row is cheap to hold in memory.
pub(super) const CHUNK_BYTES: usize = 1024 * 1024;

fn database(error: impl std::fmt::Display) -> BlobError {
    BlobError::Database(error.to_string())
}

pub(super) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Moves what fits of `bytes` into the chunk being filled; returns the rest.
pub(super) fn fill_chunk<'bytes>(pending: &mut Vec<u8>, bytes: &'bytes [u8]) -> &'bytes [u8] {
    let room = CHUNK_BYTES - pending.len();
    let (now, later) = bytes.split_at(room.min(bytes.len()));
    pending.extend_from_slice(now);
    later
}

/// A blob being received: chunks are inserted as they fill.
pub(super) struct PostgresBlobWriter {
    store: PostgresStore,
    upload_id: String,
    pending: Vec<u8>,
    next_chunk: i64,
    check: BlobCheck,
}

impl PostgresBlobWriter {
    async fn flush_chunk(&mut self) -> Result<(), BlobError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let client = self.store.client().await.map_err(database)?;
        client
            .execute(
                "INSERT INTO blob_chunks (upload_id, chunk, data) VALUES ($1, $2, $3)",
                &[&self.upload_id, &self.next_chunk, &self.pending],
            )
            .await
            .map_err(database)?;
        self.next_chunk += 1;
        self.pending.clear();
        Ok(())
    }

    async fn delete_chunks(&self) -> Result<(), BlobError> {
        let client = self.store.client().await.map_err(database)?;
        client
            .execute(
                "DELETE FROM blob_chunks WHERE upload_id = $1",
                &[&self.upload_id],
            )
            .await
            .map_err(database)?;
        Ok(())
    }

    async fn place(&mut self, expected_digest: &str) -> Result<(), BlobError> {
        self.check.verify(expected_digest)?;
        self.flush_chunk().await?;
        let client = self.store.client().await.map_err(database)?;
        let inserted = client
            .execute(
                "INSERT INTO blobs (digest, upload_id, size) VALUES ($1, $2, $3)
                 ON CONFLICT (digest) DO NOTHING",
                &[
                    &expected_digest,
                    &self.upload_id,
                    &to_i64(self.check.written()),
                ],
            )
            .await
            .map_err(database)?;
        if inserted == 0 {
            // The same payload arrived through another replica first.
            self.delete_chunks().await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl BlobWriter for PostgresBlobWriter {
    async fn write(&mut self, mut bytes: &[u8]) -> Result<(), BlobError> {
        self.check.add(bytes)?;
        while !bytes.is_empty() {
            bytes = fill_chunk(&mut self.pending, bytes);
            if self.pending.len() == CHUNK_BYTES {
                self.flush_chunk().await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>, expected_digest: &str) -> Result<(), BlobError> {
        let placed = self.place(expected_digest).await;
        if placed.is_err() {
            if let Err(error) = self.delete_chunks().await {
                tracing::warn!(%error, "cannot delete the chunks of a refused blob");
            }
        }
        placed
    }

    async fn abandon(self: Box<Self>) {
        if let Err(error) = self.delete_chunks().await {
            tracing::warn!(%error, "cannot delete the chunks of an abandoned blob");
        }
    }
}

#[async_trait::async_trait]
impl BlobStore for PostgresStore {
    async fn begin(&self, expected_size: u64) -> Result<Box<dyn BlobWriter>, BlobError> {
        Ok(Box::new(PostgresBlobWriter {
            store: self.clone(),
            upload_id: Uuid::new_v4().to_string(),
            pending: Vec::with_capacity(
                CHUNK_BYTES.min(usize::try_from(expected_size).unwrap_or(CHUNK_BYTES)),
            ),
            next_chunk: 0,
            check: BlobCheck::new(expected_size),
        }))
    }

    async fn size(&self, digest: &str) -> Result<Option<u64>, BlobError> {
        let client = self.client().await.map_err(database)?;
        let row = client
            .query_opt("SELECT size FROM blobs WHERE digest = $1", &[&digest])
            .await
            .map_err(database)?;
        Ok(row
            .map(|row| row.try_get::<_, i64>("size"))
            .transpose()
            .map_err(database)?
            .map(|size| u64::try_from(size).unwrap_or(0)))
    }

    async fn read_at(&self, digest: &str, offset: u64, limit: usize) -> Result<Vec<u8>, BlobError> {
        let client = self.client().await.map_err(database)?;
        let Some(row) = client
            .query_opt(
                "SELECT upload_id, size FROM blobs WHERE digest = $1",
                &[&digest],
            )
            .await
            .map_err(database)?
        else {
            return Err(BlobError::Database(format!("blob {digest} is missing")));
        };
        let upload_id: String = row.try_get("upload_id").map_err(database)?;
        let size = u64::try_from(row.try_get::<_, i64>("size").map_err(database)?).unwrap_or(0);
        read_chunked(&client, "blob_chunks", &upload_id, size, offset, limit)
            .await
            .map_err(database)
    }
}

/// Up to `limit` bytes from `offset` of the upload `upload_id` (`size`
/// bytes in all), kept as rows of [`CHUNK_BYTES`] in `chunk_table`
/// (`upload_id`, `chunk`, `data`): each row is cut with `substring`, so a
/// resumed download costs what it reads. Shared by image blobs and
/// forensic bundles.
pub(super) async fn read_chunked(
    client: &deadpool_postgres::Object,
    chunk_table: &'static str,
    upload_id: &str,
    size: u64,
    offset: u64,
    limit: usize,
) -> Result<Vec<u8>, StoreError> {
    let end = size.min(offset.saturating_add(limit as u64));
    let statement = client
        .prepare_cached(&format!(
            "SELECT substring(data FROM $3 FOR $4) AS part FROM {chunk_table}
             WHERE upload_id = $1 AND chunk = $2"
        ))
        .await?;
    let chunk_bytes = CHUNK_BYTES as u64;
    let mut bytes = Vec::with_capacity(usize::try_from(end.saturating_sub(offset)).unwrap_or(0));
    let mut position = offset;
    while position < end {
        let chunk = position / chunk_bytes;
        let within = position % chunk_bytes;
        let length = (chunk_bytes - within).min(end - position);
        // substring counts from 1.
        let row = client
            .query_one(
                &statement,
                &[
                    &upload_id,
                    &to_i64(chunk),
                    &i32::try_from(within + 1).unwrap_or(i32::MAX),
                    &i32::try_from(length).unwrap_or(i32::MAX),
                ],
            )
            .await?;
        let part: Vec<u8> = row.try_get("part")?;
        if part.is_empty() {
            return Err(StoreError::Backend(format!(
                "upload {upload_id} in {chunk_table} is shorter than its recorded size"
            )));
        }
        position += part.len() as u64;
        bytes.extend_from_slice(&part);
    }
    Ok(bytes)
}
