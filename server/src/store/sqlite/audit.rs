//! The hash-chained audit log in SQLite: each append reads the chain head and
//! seals the new entry inside one IMMEDIATE transaction.

use rusqlite::{params, OptionalExtension, Row};

use super::SqliteStore;
use crate::store::StoreError;
use flotte_common::audit::{seal, AuditEvent, AuditFilter, AuditRecord};

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
            "SELECT * FROM audit_log WHERE at >= ?1 AND (?2 IS NULL OR actor = ?2) ORDER BY seq",
        )?;
            let entries = statement
                .query_map(
                    params![filter.since.unwrap_or(i64::MIN), filter.actor],
                    audit_from_row,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(entries)
        })
        .await
}
