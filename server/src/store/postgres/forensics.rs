//! Forensic bundles in PostgreSQL, so that a bundle uploaded through one
//! replica is listed and served by every other: [`ForensicStore`] over the
//! `forensic_uploads`, `forensic_chunks` and `forensic_bundles` tables
//! (migration 6).
//!
//! An upload first claims its quarantine (a `forensic_uploads` row, in the
//! transaction that checks no bundle is stored yet), so two uploads —
//! through one replica or two — never run at once. Its bytes go in chunks
//! of [`CHUNK_BYTES`] under a fresh upload id, each chunk in a transaction
//! that renews the claim. Finishing deletes the claim, asks the database
//! for the size and SHA-256 of what it stored and compares them with what
//! was received, then inserts the `forensic_bundles` row — the only thing
//! listings read — all in one transaction; the row's primary key keeps the
//! first bundle of a quarantine for good. A claim left by a replica killed
//! mid-upload is taken over once it has not been renewed for
//! [`STALE_CLAIM`], its chunks deleted, so the agent's retry succeeds.

use std::time::Duration;

use uuid::Uuid;

use super::blobs::{fill_chunk, read_chunked, to_i64, CHUNK_BYTES};
use super::replicas::NOW_MS;
use super::PostgresStore;
use crate::forensics::{
    check_quarantine_id, BundleWriter, ForensicStore, ForensicsError, ReceivedBundle, StoredBundle,
};
use crate::store::{StoreError, UnixSeconds};

/// A claim not renewed for this long belongs to an upload whose replica
/// died (a live one renews it with every chunk, a few per second).
const STALE_CLAIM: Duration = Duration::from_secs(120);

/// The table of chunks (see [`read_chunked`]).
const CHUNK_TABLE: &str = "forensic_chunks";

/// An upload in progress: chunks are inserted as they fill.
struct PostgresBundleWriter {
    store: PostgresStore,
    machine_id: String,
    quarantine_id: String,
    upload_id: String,
    received_at: UnixSeconds,
    pending: Vec<u8>,
    next_chunk: i64,
    received: ReceivedBundle,
    /// Set once the bundle is visible or the upload cleaned up: dropping
    /// the writer then removes nothing.
    done: bool,
}

/// Removes an unfinished upload: its claim (if still its own) and its
/// chunks (unless a bundle names them: a finish whose answer was lost).
async fn remove_upload(
    store: &PostgresStore,
    machine_id: &str,
    quarantine_id: &str,
    upload_id: &str,
) -> Result<(), StoreError> {
    let mut client = store.client().await?;
    let transaction = client.transaction().await?;
    transaction
        .execute(
            "DELETE FROM forensic_uploads
             WHERE machine_id = $1 AND quarantine_id = $2 AND upload_id = $3",
            &[&machine_id, &quarantine_id, &upload_id],
        )
        .await?;
    transaction
        .execute(
            "DELETE FROM forensic_chunks WHERE upload_id = $1
             AND NOT EXISTS (SELECT 1 FROM forensic_bundles WHERE upload_id = $1)",
            &[&upload_id],
        )
        .await?;
    transaction.commit().await?;
    Ok(())
}

impl PostgresBundleWriter {
    /// Inserts the chunk being filled, renewing the claim in the same
    /// transaction; refused if another upload took the claim over.
    async fn flush_chunk(&mut self) -> Result<(), ForensicsError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut client = self.store.client().await?;
        let transaction = client.transaction().await.map_err(StoreError::from)?;
        let renewed = transaction
            .execute(
                &format!(
                    "UPDATE forensic_uploads SET touched_at_ms = {NOW_MS}
                     WHERE machine_id = $1 AND quarantine_id = $2 AND upload_id = $3"
                ),
                &[&self.machine_id, &self.quarantine_id, &self.upload_id],
            )
            .await
            .map_err(StoreError::from)?;
        if renewed == 0 {
            return Err(ForensicsError::UploadInProgress(self.quarantine_id.clone()));
        }
        transaction
            .execute(
                "INSERT INTO forensic_chunks (upload_id, chunk, data) VALUES ($1, $2, $3)",
                &[&self.upload_id, &self.next_chunk, &self.pending],
            )
            .await
            .map_err(StoreError::from)?;
        transaction.commit().await.map_err(StoreError::from)?;
        self.next_chunk += 1;
        self.pending.clear();
        Ok(())
    }

    /// Proves what was stored and makes it visible (see the module comment).
    async fn publish(&mut self) -> Result<StoredBundle, ForensicsError> {
        self.flush_chunk().await?;
        let mut client = self.store.client().await?;
        let transaction = client.transaction().await.map_err(StoreError::from)?;
        let released = transaction
            .execute(
                "DELETE FROM forensic_uploads
                 WHERE machine_id = $1 AND quarantine_id = $2 AND upload_id = $3",
                &[&self.machine_id, &self.quarantine_id, &self.upload_id],
            )
            .await
            .map_err(StoreError::from)?;
        if released == 0 {
            return Err(ForensicsError::UploadInProgress(self.quarantine_id.clone()));
        }
        let stored = transaction
            .query_one(
                "SELECT COALESCE(SUM(length(data)), 0)::bigint AS size,
                        encode(sha256(COALESCE(string_agg(data, ''::bytea ORDER BY chunk),
                                               ''::bytea)), 'hex') AS sha256
                 FROM forensic_chunks WHERE upload_id = $1",
                &[&self.upload_id],
            )
            .await
            .map_err(StoreError::from)?;
        let stored_size =
            u64::try_from(stored.try_get::<_, i64>("size").map_err(StoreError::from)?).unwrap_or(0);
        let stored_sha256: String = stored.try_get("sha256").map_err(StoreError::from)?;
        let bundle = StoredBundle {
            quarantine_id: self.quarantine_id.clone(),
            received_at: self.received_at,
            size: self.received.size(),
            sha256: self.received.sha256(),
            location: self.upload_id.clone(),
        };
        if (stored_size, stored_sha256.as_str()) != (bundle.size, bundle.sha256.as_str()) {
            return Err(ForensicsError::StoredDiffers {
                quarantine_id: bundle.quarantine_id,
                received_size: bundle.size,
                received_sha256: bundle.sha256,
                stored_size,
                stored_sha256,
            });
        }
        let inserted = transaction
            .execute(
                "INSERT INTO forensic_bundles
                    (machine_id, quarantine_id, upload_id, received_at, size, sha256)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (machine_id, quarantine_id) DO NOTHING",
                &[
                    &self.machine_id,
                    &self.quarantine_id,
                    &self.upload_id,
                    &self.received_at,
                    &to_i64(bundle.size),
                    &bundle.sha256,
                ],
            )
            .await
            .map_err(StoreError::from)?;
        if inserted == 0 {
            return Err(ForensicsError::AlreadyStored(self.quarantine_id.clone()));
        }
        transaction.commit().await.map_err(StoreError::from)?;
        Ok(bundle)
    }

    async fn clean_up(&mut self) {
        self.done = true;
        if let Err(error) = remove_upload(
            &self.store,
            &self.machine_id,
            &self.quarantine_id,
            &self.upload_id,
        )
        .await
        {
            tracing::warn!(%error, quarantine = %self.quarantine_id, "cannot remove an unfinished forensic upload");
        }
    }
}

#[async_trait::async_trait]
impl BundleWriter for PostgresBundleWriter {
    fn size(&self) -> u64 {
        self.received.size()
    }

    async fn write(&mut self, mut bytes: &[u8]) -> Result<(), ForensicsError> {
        self.received.add(bytes);
        while !bytes.is_empty() {
            bytes = fill_chunk(&mut self.pending, bytes);
            if self.pending.len() == CHUNK_BYTES {
                self.flush_chunk().await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<StoredBundle, ForensicsError> {
        match self.publish().await {
            Ok(bundle) => {
                self.done = true;
                Ok(bundle)
            }
            Err(error) => {
                self.clean_up().await;
                Err(error)
            }
        }
    }

    async fn abandon(mut self: Box<Self>) {
        self.clean_up().await;
    }
}

impl Drop for PostgresBundleWriter {
    /// A writer dropped unfinished (a cancelled call) cleans up in the
    /// background: `Drop` cannot wait. Until then its claim only blocks
    /// this quarantine's next upload.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        let (machine_id, quarantine_id, upload_id) = (
            std::mem::take(&mut self.machine_id),
            std::mem::take(&mut self.quarantine_id),
            std::mem::take(&mut self.upload_id),
        );
        runtime.spawn(async move {
            if let Err(error) = remove_upload(&store, &machine_id, &quarantine_id, &upload_id).await
            {
                tracing::warn!(%error, quarantine = %quarantine_id, "cannot remove a dropped forensic upload");
            }
        });
    }
}

fn bundle_of_row(row: &tokio_postgres::Row) -> Result<StoredBundle, StoreError> {
    Ok(StoredBundle {
        quarantine_id: row.try_get("quarantine_id")?,
        received_at: row.try_get("received_at")?,
        size: u64::try_from(row.try_get::<_, i64>("size")?).unwrap_or(0),
        sha256: row.try_get("sha256")?,
        location: row.try_get("upload_id")?,
    })
}

#[async_trait::async_trait]
impl ForensicStore for PostgresStore {
    async fn begin(
        &self,
        machine_id: Uuid,
        quarantine_id: &str,
        received_at: UnixSeconds,
    ) -> Result<Box<dyn BundleWriter>, ForensicsError> {
        check_quarantine_id(quarantine_id)?;
        let machine = machine_id.to_string();
        let upload_id = Uuid::new_v4().to_string();
        let in_progress = || ForensicsError::UploadInProgress(quarantine_id.to_owned());
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(StoreError::from)?;
        let stale_ms = i64::try_from(STALE_CLAIM.as_millis()).unwrap_or(i64::MAX);
        let claim = transaction
            .query_opt(
                &format!(
                    "SELECT upload_id, touched_at_ms < {NOW_MS} - $3 AS stale
                     FROM forensic_uploads WHERE machine_id = $1 AND quarantine_id = $2
                     FOR UPDATE"
                ),
                &[&machine, &quarantine_id, &stale_ms],
            )
            .await
            .map_err(StoreError::from)?;
        let claimed = match claim {
            Some(row) => {
                if !row.try_get::<_, bool>("stale").map_err(StoreError::from)? {
                    return Err(in_progress());
                }
                let abandoned: String = row.try_get("upload_id").map_err(StoreError::from)?;
                tracing::warn!(machine = %machine_id, quarantine = quarantine_id, "taking over a forensic upload abandoned for {STALE_CLAIM:?}");
                transaction
                    .execute(
                        "DELETE FROM forensic_chunks WHERE upload_id = $1",
                        &[&abandoned],
                    )
                    .await
                    .map_err(StoreError::from)?;
                transaction
                    .execute(
                        &format!(
                            "UPDATE forensic_uploads SET upload_id = $3, touched_at_ms = {NOW_MS}
                             WHERE machine_id = $1 AND quarantine_id = $2"
                        ),
                        &[&machine, &quarantine_id, &upload_id],
                    )
                    .await
                    .map_err(StoreError::from)?
            }
            None => transaction
                .execute(
                    &format!(
                        "INSERT INTO forensic_uploads
                            (machine_id, quarantine_id, upload_id, touched_at_ms)
                         VALUES ($1, $2, $3, {NOW_MS}) ON CONFLICT DO NOTHING"
                    ),
                    &[&machine, &quarantine_id, &upload_id],
                )
                .await
                .map_err(StoreError::from)?,
        };
        if claimed == 0 {
            // Another upload claimed it between our read and our insert.
            return Err(in_progress());
        }
        // Checked after the claim (a finishing upload holds its claim row
        // until its bundle row is committed), so two uploads never both pass.
        let stored = transaction
            .query_opt(
                "SELECT 1 FROM forensic_bundles WHERE machine_id = $1 AND quarantine_id = $2",
                &[&machine, &quarantine_id],
            )
            .await
            .map_err(StoreError::from)?;
        if stored.is_some() {
            return Err(ForensicsError::AlreadyStored(quarantine_id.to_owned()));
        }
        transaction.commit().await.map_err(StoreError::from)?;
        Ok(Box::new(PostgresBundleWriter {
            store: self.clone(),
            machine_id: machine,
            quarantine_id: quarantine_id.to_owned(),
            upload_id,
            received_at,
            pending: Vec::new(),
            next_chunk: 0,
            received: ReceivedBundle::new(),
            done: false,
        }))
    }

    async fn list(&self, machine_id: Uuid) -> Result<Vec<StoredBundle>, ForensicsError> {
        Ok(self
            .read_all(
                "SELECT quarantine_id, received_at, size, sha256, upload_id FROM forensic_bundles
                 WHERE machine_id = $1 ORDER BY received_at, quarantine_id",
                &[&machine_id.to_string()],
                bundle_of_row,
            )
            .await?)
    }

    async fn read_at(
        &self,
        machine_id: Uuid,
        bundle: &StoredBundle,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<u8>, ForensicsError> {
        let client = self.client().await?;
        // The size as stored, and proof that the upload is this machine's bundle.
        let row = client
            .query_opt(
                "SELECT size FROM forensic_bundles WHERE machine_id = $1 AND upload_id = $2",
                &[&machine_id.to_string(), &bundle.location],
            )
            .await
            .map_err(StoreError::from)?
            .ok_or_else(|| {
                StoreError::Backend(format!(
                    "forensic bundle of quarantine {} is missing",
                    bundle.quarantine_id
                ))
            })?;
        let size =
            u64::try_from(row.try_get::<_, i64>("size").map_err(StoreError::from)?).unwrap_or(0);
        Ok(read_chunked(&client, CHUNK_TABLE, &bundle.location, size, offset, limit).await?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::cluster;
    use super::*;
    use crate::forensics::contract;

    async fn fresh_store() -> Option<PostgresStore> {
        let url = cluster::fresh_database_url().await?;
        Some(
            PostgresStore::connect(&url, None, None)
                .await
                .expect("connect to the fresh database"),
        )
    }

    async fn count(store: &PostgresStore, table: &str) -> i64 {
        let client = store.client().await.unwrap();
        client
            .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test]
    async fn postgres_lists_complete_bundles_only() {
        let Some(store) = fresh_store().await else {
            return;
        };
        contract::every_complete_bundle_is_listed_and_partial_ones_are_not(&store).await;
        // q2: three chunks of 1 MiB or less; q1: one; the abandoned q3: none.
        assert_eq!(count(&store, CHUNK_TABLE).await, 4);
        assert_eq!(count(&store, "forensic_uploads").await, 0);
    }

    #[tokio::test]
    async fn postgres_writes_a_quarantine_once_and_keeps_nothing_of_an_abandoned_upload() {
        let Some(store) = fresh_store().await else {
            return;
        };
        contract::a_quarantine_is_written_once_and_an_abandoned_upload_leaves_nothing(&store).await;
        assert_eq!(count(&store, CHUNK_TABLE).await, 2);
        assert_eq!(count(&store, "forensic_uploads").await, 0);
    }

    #[tokio::test]
    async fn two_replicas_racing_for_one_quarantine_store_one_bundle() {
        let Some(url) = cluster::fresh_database_url().await else {
            return;
        };
        let first = PostgresStore::connect(&url, None, None).await.unwrap();
        let second = PostgresStore::connect(&url, None, None).await.unwrap();
        let machine = Uuid::new_v4();
        let (one, other) = tokio::join!(
            first.begin(machine, "q1", 1),
            second.begin(machine, "q1", 2)
        );
        let (mut winner, loser) = match (one, other) {
            (Ok(writer), Err(error)) | (Err(error), Ok(writer)) => (writer, error),
            (one, other) => panic!(
                "exactly one claim must succeed: {:?} / {:?}",
                one.map(|_| ()),
                other.map(|_| ())
            ),
        };
        assert!(
            matches!(loser, ForensicsError::UploadInProgress(_)),
            "{loser}"
        );
        winner.write(b"genuine").await.unwrap();
        winner.finish().await.unwrap();
        let seen_by_the_other = second.find(machine, Some("q1")).await.unwrap().unwrap();
        assert_eq!(
            second
                .read_at(machine, &seen_by_the_other, 0, 100)
                .await
                .unwrap(),
            b"genuine"
        );
        assert!(matches!(
            second.begin(machine, "q1", 3).await,
            Err(ForensicsError::AlreadyStored(_))
        ));
        // Another machine's listing never reaches this bundle.
        assert!(second
            .read_at(Uuid::new_v4(), &seen_by_the_other, 0, 100)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_claim_left_by_a_dead_replica_is_taken_over_once_stale() {
        let Some(store) = fresh_store().await else {
            return;
        };
        let machine = Uuid::new_v4();
        let mut dead = store.begin(machine, "q1", 1).await.unwrap();
        dead.write(&vec![7u8; CHUNK_BYTES + 1]).await.unwrap();
        // Its replica dies: nothing cleans up (the writer is leaked, as a
        // killed process would), and the claim blocks a retry until stale.
        std::mem::forget(dead);
        assert!(matches!(
            store.begin(machine, "q1", 2).await,
            Err(ForensicsError::UploadInProgress(_))
        ));
        let client = store.client().await.unwrap();
        let stale_ms = i64::try_from(STALE_CLAIM.as_millis()).unwrap() + 1000;
        client
            .execute(
                "UPDATE forensic_uploads SET touched_at_ms = touched_at_ms - $1",
                &[&stale_ms],
            )
            .await
            .unwrap();
        let mut retry = store.begin(machine, "q1", 3).await.unwrap();
        assert_eq!(
            count(&store, CHUNK_TABLE).await,
            0,
            "the dead upload's chunk"
        );
        retry.write(b"retried").await.unwrap();
        let stored = retry.finish().await.unwrap();
        assert_eq!((stored.received_at, stored.size), (3, 7));
    }

    #[tokio::test]
    async fn a_dropped_upload_is_removed_in_the_background() {
        let Some(store) = fresh_store().await else {
            return;
        };
        let machine = Uuid::new_v4();
        let mut dropped = store.begin(machine, "q1", 1).await.unwrap();
        dropped.write(&vec![1u8; CHUNK_BYTES]).await.unwrap();
        assert_eq!(count(&store, CHUNK_TABLE).await, 1);
        drop(dropped);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count(&store, "forensic_uploads").await > 0 {
            assert!(std::time::Instant::now() < deadline, "the claim stayed");
            tokio::task::yield_now().await;
        }
        assert_eq!(count(&store, CHUNK_TABLE).await, 0);
        assert!(store.begin(machine, "q1", 2).await.is_ok());
    }
}
