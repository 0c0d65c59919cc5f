//! The hash-chained audit log in SQLite: each append reads the chain head and
//! seals the new entry inside one IMMEDIATE transaction.

use rusqlite::{params, OptionalExtension, Row};

use super::SqliteStore;
use crate::store::StoreError;
use flotte_common::audit::{seal, AuditEvent, AuditFilter, AuditRecord};
use flotte_common::audit_checkpoints::AuditCheckpoint;

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        seq: row.get::<_, i64>("seq")?.max(0) as u64,
        event: AuditEvent {
            at: row.get("at")?,
            actor: row.get("actor")?,
            role: row.get("role")?,
            action: row.get("action")?,
            arguments_json: row.get("arguments_json")?,
            result: row.get("result")?,
        },
        previous_hash: row.get("previous_hash")?,
        hash: row.get("hash")?,
    })
}

pub(super) async fn append_audit(
    store: &SqliteStore,
    event: &AuditEvent,
) -> Result<AuditRecord, StoreError> {
    let event = event.clone();
    store
        .write(move |connection| {
            // IMMEDIATE: two appends must not both read the same previous entry.
            let transaction =
                connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let previous: Option<(i64, String)> = transaction
                .query_row(
                    "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let record = seal(
                event,
                previous
                    .as_ref()
                    .map(|(seq, hash)| ((*seq).max(0) as u64, hash.as_str())),
            );
            transaction.execute(
                "INSERT INTO audit_log (seq, at, actor, role, action, arguments_json, result,
                previous_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    record.seq as i64,
                    record.event.at,
                    record.event.actor,
                    record.event.role,
                    record.event.action,
                    record.event.arguments_json,
                    record.event.result,
                    record.previous_hash,
                    record.hash
                ],
            )?;
            transaction.commit()?;
            Ok(record)
        })
        .await
}

pub(super) async fn audit_entries(
    store: &SqliteStore,
    filter: &AuditFilter,
) -> Result<Vec<AuditRecord>, StoreError> {
    let filter = filter.clone();
    store
        .with_connection(move |connection| {
            let mut statement = connection.prepare(
                "SELECT * FROM audit_log WHERE at >= ?1 AND (?2 IS NULL OR actor = ?2)
                 AND seq > ?3 ORDER BY seq LIMIT ?4",
            )?;
            let entries = statement
                .query_map(
                    params![
                        filter.since.unwrap_or(i64::MIN),
                        filter.actor,
                        i64::try_from(filter.after_seq.unwrap_or(0)).unwrap_or(i64::MAX),
                        filter.limit.map_or(-1, i64::from)
                    ],
                    audit_from_row,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(entries)
        })
        .await
}

pub(super) async fn audit_head(store: &SqliteStore) -> Result<Option<(u64, String)>, StoreError> {
    store
        .with_connection(|connection| {
            Ok(connection
                .query_row(
                    "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                    [],
                    |row| Ok((row.get::<_, i64>(0)?.max(0) as u64, row.get(1)?)),
                )
                .optional()?)
        })
        .await
}

fn checkpoint_from_row(row: &Row<'_>) -> rusqlite::Result<AuditCheckpoint> {
    Ok(AuditCheckpoint {
        seq: row.get::<_, i64>("seq")?.max(0) as u64,
        head_hash: row.get("head_hash")?,
        at: row.get("at")?,
        key_id: row.get("key_id")?,
        signature: row.get("signature")?,
    })
}

pub(super) async fn insert_audit_checkpoint(
    store: &SqliteStore,
    checkpoint: &AuditCheckpoint,
) -> Result<(), StoreError> {
    let checkpoint = checkpoint.clone();
    store
        .write(move |connection| {
            connection.execute(
                "INSERT INTO audit_checkpoints (seq, head_hash, at, key_id, signature)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (seq) DO NOTHING",
                params![
                    i64::try_from(checkpoint.seq).unwrap_or(i64::MAX),
                    checkpoint.head_hash,
                    checkpoint.at,
                    checkpoint.key_id,
                    checkpoint.signature
                ],
            )?;
            Ok(())
        })
        .await
}

pub(super) async fn audit_checkpoints(
    store: &SqliteStore,
    after_seq: u64,
    up_to: Option<u64>,
) -> Result<Vec<AuditCheckpoint>, StoreError> {
    store
        .with_connection(move |connection| {
            let mut statement = connection.prepare(
                "SELECT * FROM audit_checkpoints WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
            )?;
            let checkpoints = statement
                .query_map(
                    params![
                        i64::try_from(after_seq).unwrap_or(i64::MAX),
                        up_to.map_or(i64::MAX, |seq| i64::try_from(seq).unwrap_or(i64::MAX))
                    ],
                    checkpoint_from_row,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(checkpoints)
        })
        .await
}

pub(super) async fn latest_audit_checkpoint(
    store: &SqliteStore,
) -> Result<Option<AuditCheckpoint>, StoreError> {
    store
        .with_connection(|connection| {
            Ok(connection
                .query_row(
                    "SELECT * FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
                    [],
                    checkpoint_from_row,
                )
                .optional()?)
        })
        .await
}
