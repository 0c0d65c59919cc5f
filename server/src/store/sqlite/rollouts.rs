//! SQLite implementation of [`RolloutStore`]: tables `rollouts` and
//! `rollout_machines` (one row per machine of a rollout, with its timings,
//! failure reason and the image it ran before).

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use uuid::Uuid;

use super::machine_from_row;
use super::replicas::fence_holds;
use super::SqliteStore;
use crate::domain::rollout::{
    MachineRolloutState, Plan, Rollout, RolloutImage, RolloutMachine, RolloutState,
};
use crate::store::replicas::Fence;
use crate::store::rollouts::stale_revision;
use crate::store::{DesiredImageRecord, MachineRecord, StoreError};
use crate::store::{RolloutCreation, RolloutStore};

fn corrupt(what: &str, error: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        Box::new(std::io::Error::other(format!("{what}: {error}"))),
    )
}

fn uuid_column(row: &Row<'_>, column: &str) -> rusqlite::Result<Uuid> {
    let text: String = row.get(column)?;
    Uuid::parse_str(&text).map_err(|error| corrupt(column, error))
}

fn json_column<T: serde::de::DeserializeOwned>(row: &Row<'_>, column: &str) -> rusqlite::Result<T> {
    let text: String = row.get(column)?;
    serde_json::from_str(&text).map_err(|error| corrupt(column, error))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|error| StoreError::Corrupt(error.to_string()))
}

fn rollout_from_row(row: &Row<'_>) -> rusqlite::Result<Rollout> {
    let state: String = row.get("state")?;
    let plan: Plan = json_column(row, "plan_json")?;
    Ok(Rollout {
        id: uuid_column(row, "id")?,
        image: RolloutImage {
            name: row.get("image_name")?,
            version: row.get("image_version")?,
            digest: row.get("image_digest")?,
        },
        plan,
        plan_toml: row.get("plan_toml")?,
        state: RolloutState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
        reason: row.get("reason")?,
        created_at: row.get("created_at")?,
        created_by: row.get("created_by")?,
        updated_at: row.get("updated_at")?,
        wave_stages: json_column(row, "wave_stages")?,
        current_wave: row.get("current_wave")?,
        wave_started_at: row.get("wave_started_at")?,
        approved_stages: json_column(row, "approved_stages")?,
        revision: row.get("revision")?,
    })
}

fn rollout_machine_from_row(row: &Row<'_>) -> rusqlite::Result<RolloutMachine> {
    let state: String = row.get("state")?;
    let previous: Option<String> = row.get("previous_image")?;
    Ok(RolloutMachine {
        rollout_id: uuid_column(row, "rollout_id")?,
        machine_id: uuid_column(row, "machine_id")?,
        hostname: row.get("hostname")?,
        zone: row.get("zone")?,
        stage: row.get("stage")?,
        wave: row.get("wave")?,
        state: MachineRolloutState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
        previous_image: previous
            .map(|text| serde_json::from_str::<DesiredImageRecord>(&text))
            .transpose()
            .map_err(|error| corrupt("previous_image", error))?,
        turn_at: row.get("turn_at")?,
        sent_at: row.get("sent_at")?,
        committed_at: row.get("committed_at")?,
        finished_at: row.get("finished_at")?,
        failure_reason: row.get("failure_reason")?,
    })
}

/// The JSON columns of a rollout row, encoded before entering the blocking pool.
struct RolloutRow {
    rollout: Rollout,
    plan_json: String,
    wave_stages: String,
    approved_stages: String,
}

impl RolloutRow {
    fn new(rollout: &Rollout) -> Result<Self, StoreError> {
        Ok(RolloutRow {
            rollout: rollout.clone(),
            plan_json: to_json(&rollout.plan)?,
            wave_stages: to_json(&rollout.wave_stages)?,
            approved_stages: to_json(&rollout.approved_stages)?,
        })
    }

    /// Inserts the row, or updates it if it is still at the revision read.
    fn upsert(&self, connection: &Connection) -> Result<(), StoreError> {
        let rollout = &self.rollout;
        let written = connection.execute(
            "INSERT INTO rollouts (id, image_name, image_version, image_digest, plan_json, plan_toml,
                state, reason, created_at, created_by, updated_at, wave_stages, current_wave,
                wave_started_at, approved_stages, revision)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
             ON CONFLICT (id) DO UPDATE SET state = ?7, reason = ?8, updated_at = ?11,
                current_wave = ?13, wave_started_at = ?14, approved_stages = ?15,
                revision = rollouts.revision + 1
             WHERE rollouts.revision = ?16",
            params![
                rollout.id.to_string(),
                rollout.image.name,
                rollout.image.version,
                rollout.image.digest,
                self.plan_json,
                rollout.plan_toml,
                rollout.state.as_str(),
                rollout.reason,
                rollout.created_at,
                rollout.created_by,
                rollout.updated_at,
                self.wave_stages,
                rollout.current_wave,
                rollout.wave_started_at,
                self.approved_stages,
                i64::try_from(rollout.revision).unwrap_or(i64::MAX),
            ],
        )?;
        if written == 0 {
            return Err(stale_revision(rollout));
        }
        Ok(())
    }
}

fn upsert_machines(
    connection: &Connection,
    machines: &[(RolloutMachine, Option<String>)],
) -> rusqlite::Result<()> {
    let mut statement = connection.prepare_cached(
        "INSERT INTO rollout_machines (rollout_id, machine_id, hostname, zone, stage, wave, state,
            previous_image, turn_at, sent_at, committed_at, finished_at, failure_reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT (rollout_id, machine_id) DO UPDATE SET state = ?7, turn_at = ?9,
            sent_at = ?10, committed_at = ?11, finished_at = ?12, failure_reason = ?13",
    )?;
    for (machine, previous) in machines {
        statement.execute(params![
            machine.rollout_id.to_string(),
            machine.machine_id.to_string(),
            machine.hostname,
            machine.zone,
            machine.stage,
            machine.wave,
            machine.state.as_str(),
            previous,
            machine.turn_at,
            machine.sent_at,
            machine.committed_at,
            machine.finished_at,
            machine.failure_reason,
        ])?;
    }
    Ok(())
}

fn encode_machines(
    machines: &[RolloutMachine],
) -> Result<Vec<(RolloutMachine, Option<String>)>, StoreError> {
    machines
        .iter()
        .map(|machine| {
            let previous = machine.previous_image.as_ref().map(to_json).transpose()?;
            Ok((machine.clone(), previous))
        })
        .collect()
}

/// The active (unfinished) rollouts holding any of `machines`, each with
/// the machines it holds in the order given, inside an open transaction.
fn active_holders(
    transaction: &Transaction<'_>,
    machines: &[(RolloutMachine, Option<String>)],
) -> Result<BTreeMap<Uuid, Vec<Uuid>>, StoreError> {
    let mut holders: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
    let mut statement = transaction.prepare_cached(
        "SELECT rollouts.id, rollouts.state FROM rollout_machines
         JOIN rollouts ON rollouts.id = rollout_machines.rollout_id
         WHERE rollout_machines.machine_id = ?1",
    )?;
    for (machine, _) in machines {
        let rows = statement.query_map([machine.machine_id.to_string()], |row| {
            Ok((uuid_column(row, "id")?, row.get::<_, String>("state")?))
        })?;
        for row in rows {
            let (rollout, state) = row?;
            let state = RolloutState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown rollout state {state:?}")))?;
            if !state.is_terminal() {
                holders.entry(rollout).or_default().push(machine.machine_id);
            }
        }
    }
    Ok(holders)
}

#[async_trait::async_trait]
impl RolloutStore for SqliteStore {
    async fn insert_rollout(
        &self,
        rollout: &Rollout,
        machines: &[RolloutMachine],
    ) -> Result<RolloutCreation, StoreError> {
        let row = RolloutRow::new(rollout)?;
        let machines = encode_machines(machines)?;
        self.write(move |connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let overlaps = active_holders(&transaction, &machines)?;
            if let Some((rollout, machines)) = overlaps.into_iter().next() {
                return Ok(RolloutCreation::Overlap { rollout, machines });
            }
            row.upsert(&transaction)?;
            upsert_machines(&transaction, &machines)?;
            transaction.commit()?;
            Ok(RolloutCreation::Inserted)
        })
        .await
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.with_connection(|connection| {
            let mut statement =
                connection.prepare("SELECT * FROM rollouts ORDER BY created_at DESC, id")?;
            let rows = statement.query_map([], rollout_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn rollout(&self, id: Uuid) -> Result<Option<Rollout>, StoreError> {
        self.with_connection(move |connection| {
            Ok(connection
                .query_row(
                    "SELECT * FROM rollouts WHERE id = ?1",
                    [id.to_string()],
                    rollout_from_row,
                )
                .optional()?)
        })
        .await
    }

    async fn rollout_machines(&self, id: Uuid) -> Result<Vec<RolloutMachine>, StoreError> {
        self.with_connection(move |connection| {
            let mut statement = connection.prepare(
                "SELECT * FROM rollout_machines WHERE rollout_id = ?1 ORDER BY wave, zone, hostname",
            )?;
            let rows = statement.query_map([id.to_string()], rollout_machine_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn rollout_machines_with_ids(
        &self,
        id: Uuid,
        machines: &[Uuid],
    ) -> Result<Vec<RolloutMachine>, StoreError> {
        if machines.is_empty() {
            return Ok(Vec::new());
        }
        let machines = super::machines::ids_as_json_array(machines);
        self.with_connection(move |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT * FROM rollout_machines WHERE rollout_id = ?1
                 AND machine_id IN (SELECT value FROM json_each(?2))",
            )?;
            let rows = statement.query_map([id.to_string(), machines], rollout_machine_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn apply_rollout_pass(
        &self,
        rollout: &Rollout,
        machines: &[RolloutMachine],
        desired: &[(Uuid, DesiredImageRecord)],
        fence: Option<&Fence>,
    ) -> Result<Vec<MachineRecord>, StoreError> {
        let row = RolloutRow::new(rollout)?;
        let fence = fence.cloned();
        let machines = encode_machines(machines)?;
        let desired: Vec<(String, String)> = desired
            .iter()
            .map(|(id, image)| Ok((id.to_string(), to_json(image)?)))
            .collect::<Result<_, StoreError>>()?;
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            if let Some(fence) = &fence {
                fence_holds(&transaction, fence)?;
            }
            row.upsert(&transaction)?;
            upsert_machines(&transaction, &machines)?;
            let mut updated = Vec::with_capacity(desired.len());
            {
                let mut set = transaction.prepare_cached(
                    "UPDATE machines SET desired_image = ?2, desired_version = desired_version + 1 WHERE id = ?1",
                )?;
                let mut read = transaction.prepare_cached("SELECT * FROM machines WHERE id = ?1")?;
                for (id, image) in &desired {
                    set.execute(params![id, image])?;
                    if let Some(machine) = read.query_row([id], machine_from_row).optional()? {
                        updated.push(machine);
                    }
                }
            }
            transaction.commit()?;
            Ok(updated)
        })
        .await
    }
}
