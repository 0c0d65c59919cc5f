//! The audit checkpointer: signs the chain head with the audit key once
//! `checkpoint_every_entries` entries follow the last checkpoint, or
//! `checkpoint_interval` after it while entries are added
//! (`domain::audit::checkpoint_due`). Before signing, it checks that the
//! entries since the last checkpoint still extend it: the server never
//! signs over a chain someone changed behind its back (it logs the break
//! instead, and `audit verify` names it).

use std::sync::Arc;
use std::time::Duration;

use flotte_common::audit::{AuditFilter, ChainBreak, ChainVerifier};
use flotte_common::audit_checkpoints::{sign_checkpoint, AuditCheckpoint};
use tokio_util::sync::CancellationToken;

use crate::audit_key::{AuditKey, AuditSettings};
use crate::domain::audit::checkpoint_due;
use crate::store::{Store, StoreError};
use crate::ServerState;

/// How often the head is looked at (one indexed read).
const POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the audit log no longer extends its last checkpoint at entry {seq}: not signing (run `flottectl audit verify`)")]
    LastCheckpointGone { seq: u64 },
    #[error("the audit log changed since its last checkpoint, not signing: {0}")]
    Broken(#[from] ChainBreak),
}

/// Signs the head if a checkpoint is due; the checkpoint made, if any.
pub async fn checkpoint_once(
    store: &dyn Store,
    key: &AuditKey,
    settings: AuditSettings,
    now: i64,
) -> Result<Option<AuditCheckpoint>, CheckpointError> {
    let Some((head_seq, _)) = store.audit_head().await? else {
        return Ok(None);
    };
    let last = store.latest_audit_checkpoint().await?;
    let interval = i64::try_from(settings.checkpoint_interval.as_secs()).unwrap_or(i64::MAX);
    let due = checkpoint_due(
        head_seq,
        last.as_ref()
            .map(|checkpoint| (checkpoint.seq, checkpoint.at)),
        now,
        settings.checkpoint_every_entries,
        interval,
    );
    if !due {
        return Ok(None);
    }
    let mut verifier = match &last {
        Some(checkpoint) => ChainVerifier::after(checkpoint.seq, &checkpoint.head_hash),
        None => ChainVerifier::default(),
    };
    let signed_seq = last.as_ref().map_or(0, |checkpoint| checkpoint.seq);
    if let Some(checkpoint) = &last {
        // The signed entry itself must still be there, unchanged.
        let at_checkpoint = store
            .audit_entries(&AuditFilter {
                after_seq: Some(signed_seq.saturating_sub(1)),
                limit: Some(1),
                ..AuditFilter::default()
            })
            .await?;
        if at_checkpoint
            .first()
            .is_none_or(|entry| entry.seq != checkpoint.seq || entry.hash != checkpoint.head_hash)
        {
            return Err(CheckpointError::LastCheckpointGone {
                seq: checkpoint.seq,
            });
        }
    }
    let entries = store
        .audit_entries(&AuditFilter {
            after_seq: Some(signed_seq),
            ..AuditFilter::default()
        })
        .await?;
    for entry in &entries {
        verifier.push(entry)?;
    }
    let head = verifier.summary();
    if head.entries <= signed_seq {
        return Ok(None);
    }
    let checkpoint = sign_checkpoint(&key.key_pair, head.entries, &head.head_hash, now);
    store.insert_audit_checkpoint(&checkpoint).await?;
    Ok(Some(checkpoint))
}

/// One pass, its outcome logged.
async fn checkpoint_and_log(state: &ServerState) {
    let now = state.clock.now_unix();
    match checkpoint_once(
        state.store.as_ref(),
        &state.audit_key,
        state.config.audit,
        now,
    )
    .await
    {
        Ok(Some(checkpoint)) => {
            tracing::info!(seq = checkpoint.seq, head = %checkpoint.head_hash, "audit checkpoint signed")
        }
        Ok(None) => {}
        Err(error) => tracing::error!(%error, "audit checkpoint"),
    }
}

/// Checkpoints once at once (before the server serves: a head left unsigned
/// by the last run is signed before anything new happens), then until
/// shutdown.
pub async fn start_checkpointer(state: Arc<ServerState>, shutdown: CancellationToken) {
    checkpoint_and_log(&state).await;
    tokio::spawn(async move {
        let poll = POLL.min(state.config.audit.checkpoint_interval);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(poll) => {}
            }
            checkpoint_and_log(&state).await;
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::store::SqliteStore;
    use flotte_common::audit::AuditEvent;

    fn event(at: i64) -> AuditEvent {
        AuditEvent {
            at,
            actor: "admin".into(),
            role: "admin".into(),
            action: "token.create".into(),
            arguments_json: "{}".into(),
            result: "ok".into(),
        }
    }

    #[tokio::test]
    async fn the_server_signs_due_heads_and_never_over_a_changed_chain() {
        let dir = std::env::temp_dir().join(format!("flotte-checkpoints-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(&dir.join("flotte.db")).unwrap();
        let key = AuditKey::load_or_create(&dir).unwrap();
        let settings = AuditSettings {
            checkpoint_every_entries: 3,
            checkpoint_interval: Duration::from_secs(60),
        };
        assert_eq!(
            checkpoint_once(&store, &key, settings, 0).await.unwrap(),
            None
        );
        store.append_audit(&event(1)).await.unwrap();
        let first = checkpoint_once(&store, &key, settings, 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.seq, 1);
        store.append_audit(&event(2)).await.unwrap();
        assert_eq!(
            checkpoint_once(&store, &key, settings, 20).await.unwrap(),
            None
        );
        for at in 3..=4 {
            store.append_audit(&event(at)).await.unwrap();
        }
        assert_eq!(
            checkpoint_once(&store, &key, settings, 30)
                .await
                .unwrap()
                .unwrap()
                .seq,
            4
        );

        // Edited behind the server's back: nothing more is signed.
        store.append_audit(&event(5)).await.unwrap();
        let connection = rusqlite::Connection::open(dir.join("flotte.db")).unwrap();
        connection
            .execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 5", [])
            .unwrap();
        let error = checkpoint_once(&store, &key, settings, 1_000)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("entry 5"), "{error}");
        connection
            .execute("DELETE FROM audit_log WHERE seq >= 4", [])
            .unwrap();
        store.append_audit(&event(6)).await.unwrap();
        store.append_audit(&event(7)).await.unwrap();
        let error = checkpoint_once(&store, &key, settings, 2_000)
            .await
            .unwrap_err();
        assert!(
            matches!(error, CheckpointError::LastCheckpointGone { seq: 4 }),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
