//! Operators and the deny list in PostgreSQL: a revocation stamps the row
//! and denies its identity and serial in the same transaction, and a
//! revocation or demotion that would leave no active admin is refused
//! inside that transaction, under the admins' advisory lock (so that two
//! replicas demoting the last two admins at once cannot both pass).

use deadpool_postgres::Transaction;
use tokio_postgres::Row;

use super::{already_exists, column, corrupt, lock_keys, lock_rule, PostgresStore};
use crate::store::{
    DeniedEntry, DeniedKind, OperatorChange, OperatorRecord, StoreError, UnixSeconds,
};
use flotte_common::roles::Role;

const SELECT_OPERATOR: &str = "SELECT * FROM operators WHERE name = $1";

fn operator_from_row(row: &Row) -> Result<OperatorRecord, StoreError> {
    let role: &str = column(row, "role")?;
    Ok(OperatorRecord {
        name: column(row, "name")?,
        role: role
            .parse::<Role>()
            .map_err(|error| corrupt("role", error))?,
        created_at: column(row, "created_at")?,
        created_by: column(row, "created_by")?,
        certificate_serial: column(row, "certificate_serial")?,
        certificate_not_after: column(row, "certificate_not_after")?,
        revoked_at: column(row, "revoked_at")?,
    })
}

fn denied_from_row(row: &Row) -> Result<DeniedEntry, StoreError> {
    let kind = match column::<&str>(row, "kind")? {
        "serial" => DeniedKind::Serial,
        "identity" => DeniedKind::Identity,
        other => return Err(corrupt("kind", format!("unknown deny-list kind {other:?}"))),
    };
    Ok(DeniedEntry {
        kind,
        value: column(row, "value")?,
        reason: column(row, "reason")?,
        denied_at: column(row, "denied_at")?,
    })
}

/// Adds deny-list entries inside an open transaction (an entry already
/// there keeps its first reason).
pub(super) async fn insert_denied(
    transaction: &Transaction<'_>,
    denied: &[DeniedEntry],
) -> Result<(), StoreError> {
    let statement = transaction
        .prepare_cached(
            "INSERT INTO deny_list (kind, value, reason, denied_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .await?;
    for entry in denied.iter().filter(|entry| !entry.value.is_empty()) {
        transaction
            .execute(
                &statement,
                &[
                    &entry.kind.as_str(),
                    &entry.value,
                    &entry.reason,
                    &entry.denied_at,
                ],
            )
            .await?;
    }
    Ok(())
}

pub(super) async fn insert_operator(
    store: &PostgresStore,
    operator: &OperatorRecord,
) -> Result<(), StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    client
        .execute(
            "INSERT INTO operators (name, role, created_at, created_by, certificate_serial,
                certificate_not_after, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &operator.name,
                &operator.role.as_str(),
                &operator.created_at,
                &operator.created_by,
                &operator.certificate_serial,
                &operator.certificate_not_after,
                &operator.revoked_at,
            ],
        )
        .await
        .map_err(|error| already_exists(error, format!("operator {}", operator.name)))?;
    Ok(())
}

pub(super) async fn operator(
    store: &PostgresStore,
    name: &str,
) -> Result<Option<OperatorRecord>, StoreError> {
    store
        .read_one(SELECT_OPERATOR, &[&name], operator_from_row)
        .await
}

pub(super) async fn operators(store: &PostgresStore) -> Result<Vec<OperatorRecord>, StoreError> {
    store
        .read_all(
            "SELECT * FROM operators ORDER BY name",
            &[],
            operator_from_row,
        )
        .await
}

pub(super) async fn record_operator_certificate(
    store: &PostgresStore,
    name: &str,
    serial_hex: &str,
    not_after: UnixSeconds,
) -> Result<Option<OperatorRecord>, StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    client
        .query_opt(
            "UPDATE operators SET certificate_serial = $2, certificate_not_after = $3
             WHERE name = $1 AND revoked_at IS NULL RETURNING *",
            &[&name, &serial_hex, &not_after],
        )
        .await?
        .as_ref()
        .map(operator_from_row)
        .transpose()
}

/// What a change keeping an admin does to the operator row.
enum AdminChange<'change> {
    SetRole(Role),
    Revoke {
        at: UnixSeconds,
        denied: &'change [DeniedEntry],
    },
}

/// Applies `change` to the operator `name` in one transaction under the
/// admins' lock, unless it ends an admin and the operator is the last
/// active admin: then nothing is written.
async fn change_keeping_an_admin(
    store: &PostgresStore,
    name: &str,
    change: AdminChange<'_>,
) -> Result<OperatorChange, StoreError> {
    let mut client = store.client().await?;
    let _write = store.write_timer();
    let transaction = client.transaction().await?;
    lock_rule(&transaction, lock_keys::ADMINS).await?;
    let Some(current) = transaction.query_opt(SELECT_OPERATOR, &[&name]).await? else {
        return Ok(OperatorChange::NotFound);
    };
    let current = operator_from_row(&current)?;
    let ends_admin = match change {
        AdminChange::SetRole(role) => role != Role::Admin,
        AdminChange::Revoke { .. } => true,
    };
    if ends_admin && current.role == Role::Admin && current.revoked_at.is_none() {
        let other_admins: i64 = transaction
            .query_one(
                "SELECT COUNT(*) FROM operators WHERE role = $1 AND revoked_at IS NULL
                 AND name <> $2",
                &[&Role::Admin.as_str(), &name],
            )
            .await?
            .try_get(0)?;
        if other_admins == 0 {
            return Ok(OperatorChange::LastAdmin(current));
        }
    }
    let changed = match change {
        AdminChange::SetRole(role) => {
            transaction
                .query_one(
                    "UPDATE operators SET role = $2 WHERE name = $1 RETURNING *",
                    &[&name, &role.as_str()],
                )
                .await?
        }
        AdminChange::Revoke { at, denied } => {
            let row = transaction
                .query_one(
                    "UPDATE operators SET revoked_at = COALESCE(revoked_at, $2) WHERE name = $1
                     RETURNING *",
                    &[&name, &at],
                )
                .await?;
            insert_denied(&transaction, denied).await?;
            row
        }
    };
    let changed = operator_from_row(&changed)?;
    transaction.commit().await?;
    Ok(OperatorChange::Changed(changed))
}

pub(super) async fn set_operator_role(
    store: &PostgresStore,
    name: &str,
    role: Role,
) -> Result<OperatorChange, StoreError> {
    change_keeping_an_admin(store, name, AdminChange::SetRole(role)).await
}

pub(super) async fn revoke_operator(
    store: &PostgresStore,
    name: &str,
    at: UnixSeconds,
    denied: &[DeniedEntry],
) -> Result<OperatorChange, StoreError> {
    change_keeping_an_admin(store, name, AdminChange::Revoke { at, denied }).await
}

pub(super) async fn denied_entries(store: &PostgresStore) -> Result<Vec<DeniedEntry>, StoreError> {
    store
        .read_all(
            "SELECT * FROM deny_list ORDER BY denied_at, kind, value",
            &[],
            denied_from_row,
        )
        .await
}
