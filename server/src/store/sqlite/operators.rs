//! Operators and the deny list in SQLite: a revocation stamps the row and
//! denies its identity and serial in the same transaction, and a revocation
//! or demotion that would leave no active admin is refused inside that
//! transaction (never checked beforehand by the caller).

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::{already_exists, conversion_error, select_one, SqliteStore};
use crate::store::{
    DeniedEntry, DeniedKind, OperatorChange, OperatorRecord, StoreError, UnixSeconds,
};
use flotte_common::roles::Role;

const SELECT_OPERATOR: &str = "SELECT * FROM operators WHERE name = ?1";

fn operator_from_row(row: &Row<'_>) -> rusqlite::Result<OperatorRecord> {
    Ok(OperatorRecord {
        name: row.get("name")?,
        role: row
            .get::<_, String>("role")?
            .parse::<Role>()
            .map_err(conversion_error)?,
        created_at: row.get("created_at")?,
        created_by: row.get("created_by")?,
        certificate_serial: row.get("certificate_serial")?,
        certificate_not_after: row.get("certificate_not_after")?,
        revoked_at: row.get("revoked_at")?,
    })
}

fn denied_from_row(row: &Row<'_>) -> rusqlite::Result<DeniedEntry> {
    let kind = match row.get::<_, String>("kind")?.as_str() {
        "serial" => DeniedKind::Serial,
        "identity" => DeniedKind::Identity,
        other => {
            return Err(conversion_error(StoreError::Corrupt(format!(
                "unknown deny-list kind {other:?}"
            ))))
        }
    };
    Ok(DeniedEntry {
        kind,
        value: row.get("value")?,
        reason: row.get("reason")?,
        denied_at: row.get("denied_at")?,
    })
}

/// Adds deny-list entries inside an open transaction (an entry already
/// there keeps its first reason).
fn insert_denied(
    transaction: &rusqlite::Transaction<'_>,
    denied: &[DeniedEntry],
) -> rusqlite::Result<()> {
    let mut statement = transaction.prepare(
        "INSERT OR IGNORE INTO deny_list (kind, value, reason, denied_at) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for entry in denied.iter().filter(|entry| !entry.value.is_empty()) {
        statement.execute(params![
            entry.kind.as_str(),
            entry.value,
            entry.reason,
            entry.denied_at
        ])?;
    }
    Ok(())
}

/// One revocation as one transaction: stamps the row keyed `key` with `at`
/// (the first stamp wins) and, if the row exists, adds `denied` to the deny
/// list. Returns the row as it is now.
pub(super) fn stamp_and_deny<T>(
    connection: &mut Connection,
    stamp_sql: &str,
    select_sql: &str,
    key: &str,
    at: UnixSeconds,
    denied: &[DeniedEntry],
    row: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>, StoreError> {
    let transaction = connection.transaction()?;
    transaction.execute(stamp_sql, params![key, at])?;
    let stamped = select_one(&transaction, select_sql, key, row)?;
    if stamped.is_some() {
        insert_denied(&transaction, denied)?;
    }
    transaction.commit()?;
    Ok(stamped)
}

pub(super) async fn insert_operator(
    store: &SqliteStore,
    operator: &OperatorRecord,
) -> Result<(), StoreError> {
    let operator = operator.clone();
    store
        .write(move |connection| {
            connection
                .execute(
                    "INSERT INTO operators (name, role, created_at, created_by, certificate_serial,
                    certificate_not_after, revoked_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        operator.name,
                        operator.role.as_str(),
                        operator.created_at,
                        operator.created_by,
                        operator.certificate_serial,
                        operator.certificate_not_after,
                        operator.revoked_at
                    ],
                )
                .map_err(|error| already_exists(error, format!("operator {}", operator.name)))?;
            Ok(())
        })
        .await
}

pub(super) async fn operator(
    store: &SqliteStore,
    name: &str,
) -> Result<Option<OperatorRecord>, StoreError> {
    store
        .read_one(SELECT_OPERATOR, name.to_owned(), operator_from_row)
        .await
}

pub(super) async fn operators(store: &SqliteStore) -> Result<Vec<OperatorRecord>, StoreError> {
    store
        .read_all("SELECT * FROM operators ORDER BY name", operator_from_row)
        .await
}

pub(super) async fn record_operator_certificate(
    store: &SqliteStore,
    name: &str,
    serial_hex: &str,
    not_after: UnixSeconds,
) -> Result<Option<OperatorRecord>, StoreError> {
    let (name, serial_hex) = (name.to_owned(), serial_hex.to_owned());
    store
        .write(move |connection| {
            Ok(connection
                .query_row(
                    "UPDATE operators SET certificate_serial = ?2, certificate_not_after = ?3
                     WHERE name = ?1 AND revoked_at IS NULL RETURNING *",
                    params![name, serial_hex, not_after],
                    operator_from_row,
                )
                .optional()?)
        })
        .await
}

/// Applies `change` to the operator `name` in one IMMEDIATE transaction
/// (the admin count cannot change under it), unless `ends_admin` and the
/// operator is the last active admin: then nothing is written.
fn change_keeping_an_admin(
    connection: &mut Connection,
    name: &str,
    ends_admin: bool,
    change: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<()>,
) -> Result<OperatorChange, StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(current) = select_one(&transaction, SELECT_OPERATOR, name, operator_from_row)? else {
        return Ok(OperatorChange::NotFound);
    };
    if ends_admin && current.role == Role::Admin && current.revoked_at.is_none() {
        let other_admins: i64 = transaction.query_row(
            "SELECT COUNT(*) FROM operators WHERE role = ?1 AND revoked_at IS NULL AND name <> ?2",
            params![Role::Admin.as_str(), name],
            |row| row.get(0),
        )?;
        if other_admins == 0 {
            return Ok(OperatorChange::LastAdmin(current));
        }
    }
    change(&transaction)?;
    let changed = transaction.query_row(SELECT_OPERATOR, [name], operator_from_row)?;
    transaction.commit()?;
    Ok(OperatorChange::Changed(changed))
}

pub(super) async fn set_operator_role(
    store: &SqliteStore,
    name: &str,
    role: Role,
) -> Result<OperatorChange, StoreError> {
    let name = name.to_owned();
    store
        .write(move |connection| {
            change_keeping_an_admin(connection, &name, role != Role::Admin, |transaction| {
                transaction.execute(
                    "UPDATE operators SET role = ?2 WHERE name = ?1",
                    params![name, role.as_str()],
                )?;
                Ok(())
            })
        })
        .await
}

pub(super) async fn revoke_operator(
    store: &SqliteStore,
    name: &str,
    at: UnixSeconds,
    denied: &[DeniedEntry],
) -> Result<OperatorChange, StoreError> {
    let name = name.to_owned();
    let denied = denied.to_vec();
    store
        .write(move |connection| {
            change_keeping_an_admin(connection, &name, true, |transaction| {
                transaction.execute(
                    "UPDATE operators SET revoked_at = COALESCE(revoked_at, ?2) WHERE name = ?1",
                    params![name, at],
                )?;
                insert_denied(transaction, &denied)
            })
        })
        .await
}

pub(super) async fn denied_entries(store: &SqliteStore) -> Result<Vec<DeniedEntry>, StoreError> {
    store
        .read_all(
            "SELECT * FROM deny_list ORDER BY denied_at, kind, value",
            denied_from_row,
        )
        .await
}
