//! Machines in PostgreSQL: enrollment rows, certificates, inventory, labels,
//! health transitions, desired images, batched last-seen times and
//! decommissioning.

use std::collections::BTreeMap;

use tokio_postgres::Row;
use uuid::Uuid;

use super::operators::insert_denied;
use super::{
    as_bigint, column, json_column, labels_to_json, optional_json_column, to_json, unsigned_column,
    uuid_column, PostgresStore,
};
use crate::store::{
    DeniedEntry, DesiredImageRecord, Inventory, MachineRecord, StateTransitionRecord, StoreError,
    UnixSeconds,
};

pub(super) fn machine_from_row(row: &Row) -> Result<MachineRecord, StoreError> {
    Ok(MachineRecord {
        id: uuid_column(row, "id")?,
        labels: json_column(row, "labels")?,
        zone: column(row, "zone")?,
        enrolled_at: column(row, "enrolled_at")?,
        enrolled_with_token: column(row, "enrolled_with_token")?,
        certificate_serial: column(row, "certificate_serial")?,
        previous_certificate_serial: column(row, "previous_certificate_serial")?,
        certificate_not_after: column(row, "certificate_not_after")?,
        inventory: Inventory {
            hostname: column(row, "hostname")?,
            os: column(row, "os")?,
            kernel: column(row, "kernel")?,
            arch: column(row, "arch")?,
            agent_version: column(row, "agent_version")?,
            boot_time: column(row, "boot_time")?,
        },
        last_seen: column(row, "last_seen")?,
        desired_version: unsigned_column(row, "desired_version")?,
        state: column(row, "state")?,
        state_reason: column(row, "state_reason")?,
        state_since: column(row, "state_since")?,
        retired_at: column(row, "retired_at")?,
        desired_image: optional_json_column(row, "desired_image")?,
    })
}

/// Sets a machine's desired image and bumps its desired-state version
/// (its agent must be told); the machine as it is now, if any.
pub(super) const SET_DESIRED_IMAGE: &str = "UPDATE machines SET desired_image = $2,
    desired_version = desired_version + 1 WHERE id = $1 RETURNING *";

/// [`SET_DESIRED_IMAGE`] for many machines at once: ids, images and their
/// positions as arrays unnested side by side; a machine listed twice keeps
/// the image listed last (one UPDATE cannot change a row twice).
pub(super) const SET_DESIRED_IMAGES: &str = "UPDATE machines
    SET desired_image = batch.image, desired_version = machines.desired_version + 1
    FROM (SELECT DISTINCT ON (id) id, image
          FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS pairs (id, image, position)
          ORDER BY id, position DESC) AS batch
    WHERE machines.id = batch.id RETURNING machines.*";

pub(super) async fn insert_machine(
    store: &PostgresStore,
    machine: &MachineRecord,
) -> Result<(), StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    client
        .execute(
            "INSERT INTO machines (id, labels, zone, enrolled_at, enrolled_with_token,
                certificate_serial, certificate_not_after, hostname, os, kernel, arch,
                agent_version, boot_time, last_seen, desired_version, state, state_reason,
                state_since, retired_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                $18, $19)",
            &[
                &machine.id.to_string(),
                &labels_to_json(&machine.labels)?,
                &machine.zone,
                &machine.enrolled_at,
                &machine.enrolled_with_token,
                &machine.certificate_serial,
                &machine.certificate_not_after,
                &machine.inventory.hostname,
                &machine.inventory.os,
                &machine.inventory.kernel,
                &machine.inventory.arch,
                &machine.inventory.agent_version,
                &machine.inventory.boot_time,
                &machine.last_seen,
                &as_bigint(machine.desired_version),
                &machine.state,
                &machine.state_reason,
                &machine.state_since,
                &machine.retired_at,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn machine(
    store: &PostgresStore,
    id: Uuid,
) -> Result<Option<MachineRecord>, StoreError> {
    store
        .read_one(
            "SELECT * FROM machines WHERE id = $1",
            &[&id.to_string()],
            machine_from_row,
        )
        .await
}

pub(super) async fn machines(store: &PostgresStore) -> Result<Vec<MachineRecord>, StoreError> {
    store
        .read_all(
            "SELECT * FROM machines ORDER BY zone, hostname, id",
            &[],
            machine_from_row,
        )
        .await
}

pub(super) async fn machines_with_ids(
    store: &PostgresStore,
    ids: &[Uuid],
) -> Result<Vec<MachineRecord>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    store
        .read_all(
            "SELECT * FROM machines WHERE id = ANY($1::TEXT[])",
            &[&ids],
            machine_from_row,
        )
        .await
}

pub(super) async fn record_certificate(
    store: &PostgresStore,
    id: Uuid,
    serial: &str,
    not_after: UnixSeconds,
) -> Result<(), StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    client
        .execute(
            "UPDATE machines SET previous_certificate_serial = certificate_serial,
                certificate_serial = $2, certificate_not_after = $3 WHERE id = $1",
            &[&id.to_string(), &serial, &not_after],
        )
        .await?;
    Ok(())
}

pub(super) async fn record_inventory(
    store: &PostgresStore,
    id: Uuid,
    inventory: &Inventory,
    seen_at: UnixSeconds,
) -> Result<(), StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    client
        .execute(
            "UPDATE machines SET hostname = $2, os = $3, kernel = $4, arch = $5,
                agent_version = $6, boot_time = $7, last_seen = $8 WHERE id = $1",
            &[
                &id.to_string(),
                &inventory.hostname,
                &inventory.os,
                &inventory.kernel,
                &inventory.arch,
                &inventory.agent_version,
                &inventory.boot_time,
                &seen_at,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn update_labels(
    store: &PostgresStore,
    id: Uuid,
    labels: &BTreeMap<String, String>,
) -> Result<Option<MachineRecord>, StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    let row = client
        .query_opt(
            "UPDATE machines SET labels = $2, desired_version = desired_version + 1
             WHERE id = $1 RETURNING *",
            &[&id.to_string(), &labels_to_json(labels)?],
        )
        .await?;
    row.as_ref().map(machine_from_row).transpose()
}

pub(super) async fn record_transition(
    store: &PostgresStore,
    transition: &StateTransitionRecord,
) -> Result<(), StoreError> {
    let mut client = store.client().await?;
    let _write = store.write_timer();
    let transaction = client.transaction().await?;
    let machine_id = transition.machine_id.to_string();
    transaction
        .execute(
            "INSERT INTO machine_transitions (machine_id, at, from_state, to_state, reason)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &machine_id,
                &transition.at,
                &transition.from,
                &transition.to,
                &transition.reason,
            ],
        )
        .await?;
    transaction
        .execute(
            "UPDATE machines SET state = $2, state_reason = $3, state_since = $4 WHERE id = $1",
            &[
                &machine_id,
                &transition.to,
                &transition.reason,
                &transition.at,
            ],
        )
        .await?;
    transaction.commit().await?;
    Ok(())
}

pub(super) async fn transitions(
    store: &PostgresStore,
    machine_id: Uuid,
    limit: u32,
) -> Result<Vec<StateTransitionRecord>, StoreError> {
    let client = store.client().await?;
    let rows = client
        .query(
            "SELECT at, from_state, to_state, reason FROM machine_transitions
             WHERE machine_id = $1 ORDER BY seq DESC LIMIT $2",
            &[&machine_id.to_string(), &i64::from(limit)],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(StateTransitionRecord {
                machine_id,
                at: column(row, "at")?,
                from: column(row, "from_state")?,
                to: column(row, "to_state")?,
                reason: column(row, "reason")?,
            })
        })
        .collect()
}

pub(super) async fn set_desired_image(
    store: &PostgresStore,
    id: Uuid,
    image: Option<&DesiredImageRecord>,
) -> Result<Option<MachineRecord>, StoreError> {
    let image = image.map(to_json).transpose()?;
    let client = store.client().await?;
    let _write = store.write_timer();
    let row = client
        .query_opt(SET_DESIRED_IMAGE, &[&id.to_string(), &image])
        .await?;
    row.as_ref().map(machine_from_row).transpose()
}

pub(super) async fn record_last_seen(
    store: &PostgresStore,
    seen: &[(Uuid, UnixSeconds)],
) -> Result<(), StoreError> {
    if seen.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = seen.iter().map(|(id, _)| id.to_string()).collect();
    let times: Vec<i64> = seen.iter().map(|(_, at)| *at).collect();
    let client = store.client().await?;
    let _write = store.write_timer();
    // One statement for the whole batch: the pairs as two arrays unnested
    // side by side (a machine listed twice keeps its latest time).
    client
        .execute(
            "UPDATE machines SET last_seen = GREATEST(machines.last_seen, batch.at)
             FROM (SELECT id, MAX(at) AS at FROM UNNEST($1::TEXT[], $2::BIGINT[]) AS pairs (id, at)
                   GROUP BY id) AS batch
             WHERE machines.id = batch.id",
            &[&ids, &times],
        )
        .await?;
    Ok(())
}

pub(super) async fn retire_machine(
    store: &PostgresStore,
    id: Uuid,
    at: UnixSeconds,
    denied: &[DeniedEntry],
) -> Result<Option<MachineRecord>, StoreError> {
    let mut client = store.client().await?;
    let _write = store.write_timer();
    let transaction = client.transaction().await?;
    let row = transaction
        .query_opt(
            "UPDATE machines SET retired_at = COALESCE(retired_at, $2) WHERE id = $1 RETURNING *",
            &[&id.to_string(), &at],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let machine = machine_from_row(&row)?;
    insert_denied(&transaction, denied).await?;
    transaction.commit().await?;
    Ok(Some(machine))
}
