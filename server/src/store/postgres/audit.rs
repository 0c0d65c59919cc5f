//! The hash-chained audit log in PostgreSQL: each append takes the chain's
//! advisory lock, reads the head and seals the new entry in one
//! transaction, so that appends from every replica make one chain.

use tokio_postgres::Row;

use super::{as_bigint, column, lock_keys, lock_rule, unsigned_column, PostgresStore};
use crate::store::StoreError;
use flotte_common::audit::{seal, AuditEvent, AuditFilter, AuditRecord};
use flotte_common::audit_checkpoints::AuditCheckpoint;

fn audit_from_row(row: &Row) -> Result<AuditRecord, StoreError> {
    Ok(AuditRecord {
        seq: unsigned_column(row, "seq")?,
        event: AuditEvent {
            at: column(row, "at")?,
            actor: column(row, "actor")?,
            role: column(row, "role")?,
            action: column(row, "action")?,
            arguments_json: column(row, "arguments_json")?,
            result: column(row, "result")?,
        },
        previous_hash: column(row, "previous_hash")?,
        hash: column(row, "hash")?,
    })
}

pub(super) async fn append_audit(
    store: &PostgresStore,
    event: &AuditEvent,
) -> Result<AuditRecord, StoreError> {
    let mut client = store.client().await?;
    let _write = store.write_timer();
    let transaction = client.transaction().await?;
    // Two appends must not both read the same head.
    lock_rule(&transaction, lock_keys::AUDIT_CHAIN).await?;
    let head = transaction
        .query_opt(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await?;
    let previous: Option<(u64, String)> = head
        .map(|row| Ok::<_, StoreError>((unsigned_column(&row, "seq")?, column(&row, "hash")?)))
        .transpose()?;
    let record = seal(
        event.clone(),
        previous.as_ref().map(|(seq, hash)| (*seq, hash.as_str())),
    );
    transaction
        .execute(
            "INSERT INTO audit_log (seq, at, actor, role, action, arguments_json, result,
                previous_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &as_bigint(record.seq),
                &record.event.at,
                &record.event.actor,
                &record.event.role,
                &record.event.action,
                &record.event.arguments_json,
                &record.event.result,
                &record.previous_hash,
                &record.hash,
            ],
        )
        .await?;
    transaction.commit().await?;
    Ok(record)
}

pub(super) async fn audit_entries(
    store: &PostgresStore,
    filter: &AuditFilter,
) -> Result<Vec<AuditRecord>, StoreError> {
    store
        .read_all(
            "SELECT * FROM audit_log WHERE at >= $1 AND ($2::TEXT IS NULL OR actor = $2)
             AND seq > $3 ORDER BY seq LIMIT $4",
            &[
                &filter.since.unwrap_or(i64::MIN),
                &filter.actor,
                &as_bigint(filter.after_seq.unwrap_or(0)),
                &filter.limit.map(i64::from),
            ],
            audit_from_row,
        )
        .await
}

pub(super) async fn audit_head(store: &PostgresStore) -> Result<Option<(u64, String)>, StoreError> {
    let rows = store
        .read_all(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            &[],
            |row| Ok((unsigned_column(row, "seq")?, column(row, "hash")?)),
        )
        .await?;
    Ok(rows.into_iter().next())
}

fn checkpoint_from_row(row: &Row) -> Result<AuditCheckpoint, StoreError> {
    Ok(AuditCheckpoint {
        seq: unsigned_column(row, "seq")?,
        head_hash: column(row, "head_hash")?,
        at: column(row, "at")?,
        key_id: column(row, "key_id")?,
        signature: column(row, "signature")?,
    })
}

pub(super) async fn insert_audit_checkpoint(
    store: &PostgresStore,
    checkpoint: &AuditCheckpoint,
) -> Result<(), StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    client
        .execute(
            "INSERT INTO audit_checkpoints (seq, head_hash, at, key_id, signature)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
            &[
                &as_bigint(checkpoint.seq),
                &checkpoint.head_hash,
                &checkpoint.at,
                &checkpoint.key_id,
                &checkpoint.signature,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn audit_checkpoints(
    store: &PostgresStore,
    after_seq: u64,
    up_to: Option<u64>,
) -> Result<Vec<AuditCheckpoint>, StoreError> {
    store
        .read_all(
            "SELECT * FROM audit_checkpoints WHERE seq > $1 AND seq <= $2 ORDER BY seq",
            &[&as_bigint(after_seq), &up_to.map_or(i64::MAX, as_bigint)],
            checkpoint_from_row,
        )
        .await
}

pub(super) async fn latest_audit_checkpoint(
    store: &PostgresStore,
) -> Result<Option<AuditCheckpoint>, StoreError> {
    let rows = store
        .read_all(
            "SELECT * FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
            &[],
            checkpoint_from_row,
        )
        .await?;
    Ok(rows.into_iter().next())
}
