//! Machines in SQLite: enrollment rows, certificates, inventory, labels,
//! health transitions, desired images, batched last-seen times and
//! decommissioning.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Row};
use uuid::Uuid;

use super::operators::stamp_and_deny;
use super::{labels_from_json, labels_to_json, select_one, SqliteStore};
use crate::store::{
    DeniedEntry, DesiredImageRecord, Inventory, MachineRecord, StateTransitionRecord, StoreError,
    UnixSeconds,
};

pub(super) fn machine_from_row(row: &Row<'_>) -> rusqlite::Result<MachineRecord> {
    let id: String = row.get("id")?;
    let id = Uuid::parse_str(&id).map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(error))
    })?;
    Ok(MachineRecord {
        id,
        labels: labels_from_json(&row.get::<_, String>("labels")?)?,
        zone: row.get("zone")?,
        enrolled_at: row.get("enrolled_at")?,
        enrolled_with_token: row.get("enrolled_with_token")?,
        certificate_serial: row.get("certificate_serial")?,
        previous_certificate_serial: row.get("previous_certificate_serial")?,
        certificate_not_after: row.get("certificate_not_after")?,
        inventory: Inventory {
            hostname: row.get("hostname")?,
            os: row.get("os")?,
            kernel: row.get("kernel")?,
            arch: row.get("arch")?,
            agent_version: row.get("agent_version")?,
            boot_time: row.get("boot_time")?,
        },
        last_seen: row.get("last_seen")?,
        desired_version: row.get::<_, i64>("desired_version")?.max(0) as u64,
        state: row.get("state")?,
        state_reason: row.get("state_reason")?,
        state_since: row.get("state_since")?,
        retired_at: row.get("retired_at")?,
        desired_image: match row.get::<_, Option<String>>("desired_image")? {
            Some(text) => Some(serde_json::from_str(&text).map_err(|error| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    Box::new(error),
                )
            })?),
            None => None,
        },
    })
}

pub(super) async fn insert_machine(
    store: &SqliteStore,
    machine: &MachineRecord,
) -> Result<(), StoreError> {
    let machine = machine.clone();
    store
        .write(move |connection| {
            connection.execute(
                "INSERT INTO machines (id, labels, zone, enrolled_at, enrolled_with_token,
                certificate_serial, certificate_not_after, hostname, os, kernel, arch,
                agent_version, boot_time, last_seen, desired_version, state, state_reason,
                state_since, retired_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                ?18, ?19)",
                params![
                    machine.id.to_string(),
                    labels_to_json(&machine.labels),
                    machine.zone,
                    machine.enrolled_at,
                    machine.enrolled_with_token,
                    machine.certificate_serial,
                    machine.certificate_not_after,
                    machine.inventory.hostname,
                    machine.inventory.os,
                    machine.inventory.kernel,
                    machine.inventory.arch,
                    machine.inventory.agent_version,
                    machine.inventory.boot_time,
                    machine.last_seen,
                    machine.desired_version as i64,
                    machine.state,
                    machine.state_reason,
                    machine.state_since,
                    machine.retired_at,
                ],
            )?;
            Ok(())
        })
        .await
}

pub(super) async fn machine(
    store: &SqliteStore,
    id: Uuid,
) -> Result<Option<MachineRecord>, StoreError> {
    store
        .read_one(
            "SELECT * FROM machines WHERE id = ?1",
            id.to_string().to_string(),
            machine_from_row,
        )
        .await
}

pub(super) async fn machines(store: &SqliteStore) -> Result<Vec<MachineRecord>, StoreError> {
    store
        .read_all(
            "SELECT * FROM machines ORDER BY zone, hostname, id",
            machine_from_row,
        )
        .await
}

pub(super) async fn machines_with_ids(
    store: &SqliteStore,
    ids: &[Uuid],
) -> Result<Vec<MachineRecord>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids = ids_as_json_array(ids);
    store
        .with_connection(move |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT * FROM machines WHERE id IN (SELECT value FROM json_each(?1))",
            )?;
            let rows = statement.query_map([ids], machine_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
}

/// `ids` as one JSON array of strings: SQLite binds no arrays, and
/// `json_each` unnests this one inside a query.
pub(super) fn ids_as_json_array(ids: &[Uuid]) -> String {
    serde_json::Value::from(ids.iter().map(Uuid::to_string).collect::<Vec<_>>()).to_string()
}

pub(super) async fn record_certificate(
    store: &SqliteStore,
    id: Uuid,
    serial: &str,
    not_after: UnixSeconds,
) -> Result<(), StoreError> {
    let serial = serial.to_owned();
    store
        .write(move |connection| {
            connection.execute(
                "UPDATE machines SET previous_certificate_serial = certificate_serial,
                certificate_serial = ?2, certificate_not_after = ?3 WHERE id = ?1",
                params![id.to_string(), serial, not_after],
            )?;
            Ok(())
        })
        .await
}

pub(super) async fn record_inventory(
    store: &SqliteStore,
    id: Uuid,
    inventory: &Inventory,
    seen_at: UnixSeconds,
) -> Result<(), StoreError> {
    let inventory = inventory.clone();
    store
        .write(move |connection| {
            connection.execute(
                "UPDATE machines SET hostname = ?2, os = ?3, kernel = ?4, arch = ?5,
                agent_version = ?6, boot_time = ?7, last_seen = ?8 WHERE id = ?1",
                params![
                    id.to_string(),
                    inventory.hostname,
                    inventory.os,
                    inventory.kernel,
                    inventory.arch,
                    inventory.agent_version,
                    inventory.boot_time,
                    seen_at
                ],
            )?;
            Ok(())
        })
        .await
}

pub(super) async fn update_labels(
    store: &SqliteStore,
    id: Uuid,
    labels: &BTreeMap<String, String>,
) -> Result<Option<MachineRecord>, StoreError> {
    let labels = labels_to_json(labels);
    store
        .write(move |connection| {
            let transaction = connection.transaction()?;
            transaction.execute(
            "UPDATE machines SET labels = ?2, desired_version = desired_version + 1 WHERE id = ?1",
            params![id.to_string(), labels],
        )?;
            let machine = select_one(
                &transaction,
                "SELECT * FROM machines WHERE id = ?1",
                &id.to_string(),
                machine_from_row,
            )?;
            transaction.commit()?;
            Ok(machine)
        })
        .await
}

pub(super) async fn record_transition(
    store: &SqliteStore,
    transition: &StateTransitionRecord,
) -> Result<(), StoreError> {
    let transition = transition.clone();
    store
        .write(move |connection| {
            let transaction = connection.transaction()?;
            transaction.execute(
                "INSERT INTO machine_transitions (machine_id, at, from_state, to_state, reason)
             VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    transition.machine_id.to_string(),
                    transition.at,
                    transition.from,
                    transition.to,
                    transition.reason
                ],
            )?;
            transaction.execute(
                "UPDATE machines SET state = ?2, state_reason = ?3, state_since = ?4 WHERE id = ?1",
                params![
                    transition.machine_id.to_string(),
                    transition.to,
                    transition.reason,
                    transition.at
                ],
            )?;
            transaction.commit()?;
            Ok(())
        })
        .await
}

pub(super) async fn transitions(
    store: &SqliteStore,
    machine_id: Uuid,
    limit: u32,
) -> Result<Vec<StateTransitionRecord>, StoreError> {
    store
        .with_connection(move |connection| {
            let mut statement = connection.prepare(
                "SELECT at, from_state, to_state, reason FROM machine_transitions
             WHERE machine_id = ?1 ORDER BY seq DESC LIMIT ?2",
            )?;
            let transitions = statement
                .query_map(params![machine_id.to_string(), limit], |row| {
                    Ok(StateTransitionRecord {
                        machine_id,
                        at: row.get(0)?,
                        from: row.get(1)?,
                        to: row.get(2)?,
                        reason: row.get(3)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(transitions)
        })
        .await
}

pub(super) async fn set_desired_image(
    store: &SqliteStore,
    id: Uuid,
    image: Option<&DesiredImageRecord>,
) -> Result<Option<MachineRecord>, StoreError> {
    let image = image
        .map(serde_json::to_string)
        .transpose()
        .map_err(|error| StoreError::Corrupt(error.to_string()))?;
    store.write(move |connection| {
        let transaction = connection.transaction()?;
        transaction.execute(
            "UPDATE machines SET desired_image = ?2, desired_version = desired_version + 1 WHERE id = ?1",
            params![id.to_string(), image],
        )?;
        let machine = transaction
            .query_row(
                "SELECT * FROM machines WHERE id = ?1",
                [id.to_string()],
                machine_from_row,
            )
            .optional()?;
        transaction.commit()?;
        Ok(machine)
    })
    .await
}

pub(super) async fn record_last_seen(
    store: &SqliteStore,
    seen: &[(Uuid, UnixSeconds)],
) -> Result<(), StoreError> {
    if seen.is_empty() {
        return Ok(());
    }
    let seen = seen.to_vec();
    store
        .write(move |connection| {
            let transaction = connection.transaction()?;
            {
                let mut statement = transaction
                    .prepare("UPDATE machines SET last_seen = MAX(last_seen, ?2) WHERE id = ?1")?;
                for (id, at) in &seen {
                    statement.execute(params![id.to_string(), at])?;
                }
            }
            transaction.commit()?;
            Ok(())
        })
        .await
}

pub(super) async fn retire_machine(
    store: &SqliteStore,
    id: Uuid,
    at: UnixSeconds,
    denied: &[DeniedEntry],
) -> Result<Option<MachineRecord>, StoreError> {
    let denied = denied.to_vec();
    store
        .write(move |connection| {
            stamp_and_deny(
                connection,
                "UPDATE machines SET retired_at = COALESCE(retired_at, ?2) WHERE id = ?1",
                "SELECT * FROM machines WHERE id = ?1",
                &id.to_string(),
                at,
                &denied,
                machine_from_row,
            )
        })
        .await
}
