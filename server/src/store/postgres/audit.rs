//! The hash-chained audit log in PostgreSQL: each append takes the chain's
//! advisory lock, reads the head and seals the new entry in one
//! transaction, so that appends from every replica make one chain.

use tokio_postgres::Row;

use super::{as_bigint, column, lock_keys, lock_rule, unsigned_column, PostgresStore};
use crate::store::StoreError;
use flotte_common::audit::{seal, AuditEvent, AuditFilter, AuditRecord};

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
             ORDER BY seq",
            &[&filter.since.unwrap_or(i64::MIN), &filter.actor],
            audit_from_row,
        )
        .await
}
