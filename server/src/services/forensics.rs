//! Forensic uploads: which bundles a quarantined machine may store. Exactly
//! one bundle per quarantine — the first complete upload stands and every
//! later one is refused, so that a compromised machine cannot bury the
//! genuine bundle under a forged one — each bundle at most
//! `max_bundle_bytes`, and all of a machine's kept bundles together at most
//! `machine_quota_bytes`. Both bounds are checked before bytes reach the
//! store (files, or PostgreSQL for replicas): at the start against what is
//! kept, then before every chunk.

use uuid::Uuid;

use crate::forensics::{
    BundleWriter, ForensicStore, ForensicsError, ForensicsLimits, StoredBundle,
};
use crate::store::repair::QuarantineRecord;
use crate::store::{StoreError, UnixSeconds};
use crate::ServerState;

#[derive(Debug, thiserror::Error)]
pub enum ForensicUploadError {
    #[error("machine {0} is not quarantined")]
    NotQuarantined(Uuid),
    #[error("quarantine {} is not the machine's current one ({current})", flotte_proto::names::quoted_prefix(.offered))]
    NotCurrentQuarantine { offered: String, current: String },
    #[error("forensic bundle for quarantine {0} already stored; later uploads are refused (the first one stands)")]
    AlreadyUploaded(String),
    #[error("an upload for quarantine {0} is in progress; a second one is refused")]
    UploadInProgress(String),
    #[error("forensic bundle larger than {limit} bytes (forensics.max_bundle_bytes)")]
    BundleTooLarge { limit: u64 },
    #[error("machine {machine_id} keeps {kept} bytes of forensic bundles; this upload would pass its quota of {quota} bytes (forensics.machine_quota_bytes)")]
    QuotaExceeded {
        machine_id: Uuid,
        kept: u64,
        quota: u64,
    },
    #[error(transparent)]
    Files(ForensicsError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ForensicsError> for ForensicUploadError {
    fn from(error: ForensicsError) -> Self {
        match error {
            ForensicsError::AlreadyStored(id) => ForensicUploadError::AlreadyUploaded(id),
            ForensicsError::UploadInProgress(id) => ForensicUploadError::UploadInProgress(id),
            other => ForensicUploadError::Files(other),
        }
    }
}

/// An accepted upload: bytes go through `write`, which refuses a chunk
/// that would pass either bound before writing it.
pub struct ForensicUpload {
    writer: Box<dyn BundleWriter>,
    machine_id: Uuid,
    limits: ForensicsLimits,
    /// Bytes of the machine's bundles kept before this one.
    kept: u64,
}

/// Starts the upload of `offered_quarantine_id`'s bundle for a machine whose
/// current quarantine is `current` (read from the store by the caller).
pub async fn begin_upload(
    files: &dyn ForensicStore,
    limits: ForensicsLimits,
    machine_id: Uuid,
    current: Option<&QuarantineRecord>,
    offered_quarantine_id: &str,
    now: UnixSeconds,
) -> Result<ForensicUpload, ForensicUploadError> {
    let current = current.ok_or(ForensicUploadError::NotQuarantined(machine_id))?;
    if current.id != offered_quarantine_id {
        return Err(ForensicUploadError::NotCurrentQuarantine {
            offered: offered_quarantine_id.to_owned(),
            current: current.id.clone(),
        });
    }
    let writer = files.begin(machine_id, &current.id, now).await?;
    let kept = files
        .list(machine_id)
        .await?
        .iter()
        .map(|bundle| bundle.size)
        .sum();
    let upload = ForensicUpload {
        writer,
        machine_id,
        limits,
        kept,
    };
    // A machine at its quota is refused before its first byte.
    upload.check_room(0)?;
    Ok(upload)
}

/// `begin_upload` for the machine's current quarantine in the store.
pub async fn begin_upload_for_machine(
    state: &ServerState,
    machine_id: Uuid,
    offered_quarantine_id: &str,
) -> Result<ForensicUpload, ForensicUploadError> {
    let current = state.repair.store.quarantine(machine_id).await?;
    begin_upload(
        state.repair.forensics.as_ref(),
        state.config.forensics,
        machine_id,
        current.as_ref(),
        offered_quarantine_id,
        state.clock.now_unix(),
    )
    .await
}

impl ForensicUpload {
    fn check_room(&self, more: u64) -> Result<(), ForensicUploadError> {
        let size = self.writer.size().saturating_add(more);
        if size > self.limits.max_bundle_bytes {
            return Err(ForensicUploadError::BundleTooLarge {
                limit: self.limits.max_bundle_bytes,
            });
        }
        if self.kept.saturating_add(size) > self.limits.machine_quota_bytes
            || (more == 0 && self.kept >= self.limits.machine_quota_bytes)
        {
            return Err(ForensicUploadError::QuotaExceeded {
                machine_id: self.machine_id,
                kept: self.kept,
                quota: self.limits.machine_quota_bytes,
            });
        }
        Ok(())
    }

    /// Writes one chunk, unless it would pass a bound (then nothing of it
    /// is written, and dropping the upload removes what was).
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), ForensicUploadError> {
        self.check_room(bytes.len() as u64)?;
        Ok(self.writer.write(bytes).await?)
    }

    /// Stores the bundle; fails if one for the quarantine appeared meanwhile.
    pub async fn finish(self) -> Result<StoredBundle, ForensicUploadError> {
        Ok(self.writer.finish().await?)
    }

    /// Removes what was written (an upload refused or broken off midway),
    /// before returning; dropping the upload does so in the background.
    pub async fn abandon(self) {
        self.writer.abandon().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::PathBuf;

    use super::*;
    use crate::forensics::DirectoryForensicStore;

    struct Fixture {
        root: PathBuf,
        files: DirectoryForensicStore,
        machine_id: Uuid,
        limits: ForensicsLimits,
    }

    impl Fixture {
        fn new(max_bundle_bytes: u64, machine_quota_bytes: u64) -> Self {
            let root =
                std::env::temp_dir().join(format!("flotte-forensic-rules-{}", Uuid::new_v4()));
            Fixture {
                files: DirectoryForensicStore::new(&root),
                root,
                machine_id: Uuid::new_v4(),
                limits: ForensicsLimits {
                    max_bundle_bytes,
                    machine_quota_bytes,
                },
            }
        }

        fn quarantine(&self, id: &str) -> QuarantineRecord {
            QuarantineRecord {
                machine_id: self.machine_id,
                id: id.into(),
                reason: "test".into(),
                since: 1,
                by: "alice".into(),
            }
        }

        async fn begin(&self, id: &str, now: i64) -> Result<ForensicUpload, ForensicUploadError> {
            let current = self.quarantine(id);
            begin_upload(
                &self.files,
                self.limits,
                self.machine_id,
                Some(&current),
                id,
                now,
            )
            .await
        }

        async fn upload(&self, id: &str, now: i64, body: &[u8]) -> Result<(), ForensicUploadError> {
            let mut upload = self.begin(id, now).await?;
            upload.write(body).await?;
            upload.finish().await.map(drop)
        }

        fn kept(&self) -> Vec<String> {
            let directory = self
                .root
                .join("forensics")
                .join(self.machine_id.to_string());
            let mut names: Vec<String> = std::fs::read_dir(directory)
                .map(|entries| {
                    entries
                        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            names
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[tokio::test]
    async fn a_second_upload_for_one_quarantine_is_refused_and_the_first_stands() {
        let fixture = Fixture::new(1024, 4096);
        fixture.upload("q1", 100, b"genuine").await.unwrap();
        let refused = fixture.upload("q1", 200, b"forged").await.unwrap_err();
        assert!(
            matches!(&refused, ForensicUploadError::AlreadyUploaded(id) if id == "q1"),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("first one stands"),
            "{refused}"
        );
        let served = fixture
            .files
            .find(fixture.machine_id, Some("q1"))
            .await
            .unwrap()
            .unwrap();
        let bytes = fixture
            .files
            .read_at(fixture.machine_id, &served, 0, 100)
            .await
            .unwrap();
        assert_eq!(bytes, b"genuine");
        assert_eq!(fixture.kept(), ["000000000100-q1.tar"]);
    }

    #[tokio::test]
    async fn a_concurrent_upload_for_the_same_quarantine_is_refused() {
        let fixture = Fixture::new(1024, 4096);
        let _first = fixture.begin("q1", 100).await.unwrap();
        assert!(matches!(
            fixture.begin("q1", 101).await,
            Err(ForensicUploadError::UploadInProgress(_))
        ));
    }

    #[tokio::test]
    async fn only_the_current_quarantine_of_a_quarantined_machine_uploads() {
        let fixture = Fixture::new(1024, 4096);
        let current = fixture.quarantine("q2");
        let stale = begin_upload(
            &fixture.files,
            fixture.limits,
            fixture.machine_id,
            Some(&current),
            "q1",
            1,
        )
        .await;
        assert!(matches!(
            stale,
            Err(ForensicUploadError::NotCurrentQuarantine { .. })
        ));
        let released = begin_upload(
            &fixture.files,
            fixture.limits,
            fixture.machine_id,
            None,
            "q2",
            1,
        )
        .await;
        assert!(matches!(
            released,
            Err(ForensicUploadError::NotQuarantined(_))
        ));
        assert!(fixture.kept().is_empty());
    }

    #[tokio::test]
    async fn a_bundle_past_the_size_cap_is_refused_before_the_chunk_is_written() {
        let fixture = Fixture::new(10, 4096);
        let mut upload = fixture.begin("q1", 100).await.unwrap();
        upload.write(b"0123456789").await.unwrap();
        let refused = upload.write(b"x").await.unwrap_err();
        assert!(
            matches!(refused, ForensicUploadError::BundleTooLarge { limit: 10 }),
            "{refused}"
        );
        assert_eq!(upload.writer.size(), 10);
        drop(upload);
        assert!(fixture.kept().is_empty(), "{:?}", fixture.kept());
    }

    #[tokio::test]
    async fn uploads_past_the_machine_quota_are_refused_and_kept_bundles_stay() {
        let fixture = Fixture::new(6, 10);
        fixture.upload("q1", 100, b"aaaaaa").await.unwrap();
        let refused = fixture.upload("q2", 200, b"bbbbb").await.unwrap_err();
        assert!(
            matches!(
                refused,
                ForensicUploadError::QuotaExceeded {
                    kept: 6,
                    quota: 10,
                    ..
                }
            ),
            "{refused}"
        );
        fixture.upload("q3", 300, b"cccc").await.unwrap();
        // Exactly at the quota: the next upload is refused before a byte.
        assert!(matches!(
            fixture.begin("q4", 400).await,
            Err(ForensicUploadError::QuotaExceeded { kept: 10, .. })
        ));
        assert_eq!(
            fixture.kept(),
            ["000000000100-q1.tar", "000000000300-q3.tar"]
        );
    }
}
