//! PostgreSQL implementation of [`RolloutStore`]: tables `rollouts` and
//! `rollout_machines`. Creating a rollout checks that no active rollout
//! holds its machines under the rollout-creation advisory lock, so that
//! two replicas creating rollouts over one machine at once make one.

use std::collections::BTreeMap;

use deadpool_postgres::Transaction;
use tokio_postgres::Row;
use uuid::Uuid;

use super::machines::{machine_from_row, SET_DESIRED_IMAGES};
use super::replicas::fence_holds;
use super::{
    column, corrupt, json_column, lock_keys, lock_rule, optional_json_column, to_json,
    unsigned_column, uuid_column, PostgresStore,
};
use crate::domain::rollout::{
    MachineRolloutState, Rollout, RolloutImage, RolloutMachine, RolloutState,
};
use crate::store::replicas::Fence;
use crate::store::rollouts::stale_revision;
use crate::store::{DesiredImageRecord, MachineRecord, StoreError};
use crate::store::{RolloutCreation, RolloutStore};

fn rollout_from_row(row: &Row) -> Result<Rollout, StoreError> {
    let state: &str = column(row, "state")?;
    Ok(Rollout {
        id: uuid_column(row, "id")?,
        image: RolloutImage {
            name: column(row, "image_name")?,
            version: column(row, "image_version")?,
            digest: column(row, "image_digest")?,
        },
        plan: json_column(row, "plan_json")?,
        plan_toml: column(row, "plan_toml")?,
        state: RolloutState::parse(state).ok_or_else(|| corrupt("state", state))?,
        reason: column(row, "reason")?,
        created_at: column(row, "created_at")?,
        created_by: column(row, "created_by")?,
        updated_at: column(row, "updated_at")?,
        wave_stages: json_column(row, "wave_stages")?,
        current_wave: unsigned_column(row, "current_wave")?,
        wave_started_at: column(row, "wave_started_at")?,
        approved_stages: json_column(row, "approved_stages")?,
        revision: unsigned_column(row, "revision")?,
    })
}

fn rollout_machine_from_row(row: &Row) -> Result<RolloutMachine, StoreError> {
    let state: &str = column(row, "state")?;
    Ok(RolloutMachine {
        rollout_id: uuid_column(row, "rollout_id")?,
        machine_id: uuid_column(row, "machine_id")?,
        hostname: column(row, "hostname")?,
        zone: column(row, "zone")?,
        stage: unsigned_column(row, "stage")?,
        wave: unsigned_column(row, "wave")?,
        state: MachineRolloutState::parse(state).ok_or_else(|| corrupt("state", state))?,
        previous_image: optional_json_column(row, "previous_image")?,
        turn_at: column(row, "turn_at")?,
        sent_at: column(row, "sent_at")?,
        committed_at: column(row, "committed_at")?,
        finished_at: column(row, "finished_at")?,
        failure_reason: column(row, "failure_reason")?,
    })
}

/// Inserts or updates the rollout row inside an open transaction (an
/// update changes only what a pass may change).
async fn upsert_rollout(
    transaction: &Transaction<'_>,
    rollout: &Rollout,
) -> Result<(), StoreError> {
    let written = transaction
        .execute(
            "INSERT INTO rollouts (id, image_name, image_version, image_digest, plan_json,
                plan_toml, state, reason, created_at, created_by, updated_at, wave_stages,
                current_wave, wave_started_at, approved_stages, revision)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
             ON CONFLICT (id) DO UPDATE SET state = $7, reason = $8, updated_at = $11,
                current_wave = $13, wave_started_at = $14, approved_stages = $15,
                revision = rollouts.revision + 1
             WHERE rollouts.revision = $16",
            &[
                &rollout.id.to_string(),
                &rollout.image.name,
                &rollout.image.version,
                &rollout.image.digest,
                &to_json(&rollout.plan)?,
                &rollout.plan_toml,
                &rollout.state.as_str(),
                &rollout.reason,
                &rollout.created_at,
                &rollout.created_by,
                &rollout.updated_at,
                &to_json(&rollout.wave_stages)?,
                &i64::from(rollout.current_wave),
                &rollout.wave_started_at,
                &to_json(&rollout.approved_stages)?,
                &i64::try_from(rollout.revision).unwrap_or(i64::MAX),
            ],
        )
        .await?;
    if written == 0 {
        return Err(stale_revision(rollout));
    }
    Ok(())
}

async fn upsert_machines(
    transaction: &Transaction<'_>,
    machines: &[RolloutMachine],
) -> Result<(), StoreError> {
    if machines.is_empty() {
        return Ok(());
    }
    // One statement for the whole batch, the rows as columns of arrays
    // unnested side by side: a wave transition stores a hundred rows or
    // more, and one round trip each made it the slowest step of a pass.
    let mut rollout_ids = Vec::with_capacity(machines.len());
    let mut machine_ids = Vec::with_capacity(machines.len());
    let mut hostnames = Vec::with_capacity(machines.len());
    let mut zones = Vec::with_capacity(machines.len());
    let mut stages = Vec::with_capacity(machines.len());
    let mut waves = Vec::with_capacity(machines.len());
    let mut states = Vec::with_capacity(machines.len());
    let mut previous_images = Vec::with_capacity(machines.len());
    let mut turn_ats = Vec::with_capacity(machines.len());
    let mut sent_ats = Vec::with_capacity(machines.len());
    let mut committed_ats = Vec::with_capacity(machines.len());
    let mut finished_ats = Vec::with_capacity(machines.len());
    let mut failure_reasons = Vec::with_capacity(machines.len());
    for machine in machines {
        rollout_ids.push(machine.rollout_id.to_string());
        machine_ids.push(machine.machine_id.to_string());
        hostnames.push(machine.hostname.as_str());
        zones.push(machine.zone.as_str());
        stages.push(i64::from(machine.stage));
        waves.push(i64::from(machine.wave));
        states.push(machine.state.as_str());
        previous_images.push(machine.previous_image.as_ref().map(to_json).transpose()?);
        turn_ats.push(machine.turn_at);
        sent_ats.push(machine.sent_at);
        committed_ats.push(machine.committed_at);
        finished_ats.push(machine.finished_at);
        failure_reasons.push(machine.failure_reason.as_str());
    }
    let statement = transaction
        .prepare_cached(
            "INSERT INTO rollout_machines (rollout_id, machine_id, hostname, zone, stage, wave,
                state, previous_image, turn_at, sent_at, committed_at, finished_at,
                failure_reason)
             SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[],
                $5::BIGINT[], $6::BIGINT[], $7::TEXT[], $8::TEXT[], $9::BIGINT[],
                $10::BIGINT[], $11::BIGINT[], $12::BIGINT[], $13::TEXT[])
             ON CONFLICT (rollout_id, machine_id) DO UPDATE SET state = EXCLUDED.state,
                turn_at = EXCLUDED.turn_at, sent_at = EXCLUDED.sent_at,
                committed_at = EXCLUDED.committed_at, finished_at = EXCLUDED.finished_at,
                failure_reason = EXCLUDED.failure_reason",
        )
        .await?;
    transaction
        .execute(
            &statement,
            &[
                &rollout_ids,
                &machine_ids,
                &hostnames,
                &zones,
                &stages,
                &waves,
                &states,
                &previous_images,
                &turn_ats,
                &sent_ats,
                &committed_ats,
                &finished_ats,
                &failure_reasons,
            ],
        )
        .await?;
    Ok(())
}

/// Stores each machine's new desired image (and bumps its desired-state
/// version) in one statement; returns the machines as updated, in no
/// particular order. A machine listed twice gets its last image.
async fn set_desired_images(
    transaction: &Transaction<'_>,
    desired: &[(Uuid, DesiredImageRecord)],
) -> Result<Vec<MachineRecord>, StoreError> {
    if desired.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(desired.len());
    let mut images = Vec::with_capacity(desired.len());
    let mut positions = Vec::with_capacity(desired.len());
    for (position, (id, image)) in (0_i64..).zip(desired) {
        ids.push(id.to_string());
        images.push(to_json(image)?);
        positions.push(position);
    }
    let statement = transaction.prepare_cached(SET_DESIRED_IMAGES).await?;
    let rows = transaction
        .query(&statement, &[&ids, &images, &positions])
        .await?;
    rows.iter().map(machine_from_row).collect()
}

/// The active (unfinished) rollouts holding any of `machines`, each with
/// the machines it holds in the order given, inside an open transaction.
async fn active_holders(
    transaction: &Transaction<'_>,
    machines: &[RolloutMachine],
) -> Result<BTreeMap<Uuid, Vec<Uuid>>, StoreError> {
    let mut holders: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
    let statement = transaction
        .prepare_cached(
            "SELECT rollouts.id, rollouts.state FROM rollout_machines
             JOIN rollouts ON rollouts.id = rollout_machines.rollout_id
             WHERE rollout_machines.machine_id = $1",
        )
        .await?;
    for machine in machines {
        let rows = transaction
            .query(&statement, &[&machine.machine_id.to_string()])
            .await?;
        for row in &rows {
            let state: &str = column(row, "state")?;
            let state = RolloutState::parse(state).ok_or_else(|| corrupt("state", state))?;
            if !state.is_terminal() {
                holders
                    .entry(uuid_column(row, "id")?)
                    .or_default()
                    .push(machine.machine_id);
            }
        }
    }
    Ok(holders)
}

#[async_trait::async_trait]
impl RolloutStore for PostgresStore {
    async fn insert_rollout(
        &self,
        rollout: &Rollout,
        machines: &[RolloutMachine],
    ) -> Result<RolloutCreation, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        lock_rule(&transaction, lock_keys::ROLLOUT_CREATION).await?;
        let overlaps = active_holders(&transaction, machines).await?;
        if let Some((rollout, machines)) = overlaps.into_iter().next() {
            return Ok(RolloutCreation::Overlap { rollout, machines });
        }
        upsert_rollout(&transaction, rollout).await?;
        upsert_machines(&transaction, machines).await?;
        transaction.commit().await?;
        Ok(RolloutCreation::Inserted)
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.read_all(
            "SELECT * FROM rollouts ORDER BY created_at DESC, id",
            &[],
            rollout_from_row,
        )
        .await
    }

    async fn rollout(&self, id: Uuid) -> Result<Option<Rollout>, StoreError> {
        self.read_one(
            "SELECT * FROM rollouts WHERE id = $1",
            &[&id.to_string()],
            rollout_from_row,
        )
        .await
    }

    async fn rollout_machines(&self, id: Uuid) -> Result<Vec<RolloutMachine>, StoreError> {
        self.read_all(
            "SELECT * FROM rollout_machines WHERE rollout_id = $1 ORDER BY wave, zone, hostname",
            &[&id.to_string()],
            rollout_machine_from_row,
        )
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
        let machines: Vec<String> = machines.iter().map(Uuid::to_string).collect();
        self.read_all(
            "SELECT * FROM rollout_machines WHERE rollout_id = $1 AND machine_id = ANY($2::TEXT[])",
            &[&id.to_string(), &machines],
            rollout_machine_from_row,
        )
        .await
    }

    async fn apply_rollout_pass(
        &self,
        rollout: &Rollout,
        machines: &[RolloutMachine],
        desired: &[(Uuid, DesiredImageRecord)],
        fence: Option<&Fence>,
    ) -> Result<Vec<MachineRecord>, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        if let Some(fence) = fence {
            fence_holds(&transaction, fence).await?;
        }
        upsert_rollout(&transaction, rollout).await?;
        upsert_machines(&transaction, machines).await?;
        let updated = set_desired_images(&transaction, desired).await?;
        transaction.commit().await?;
        Ok(updated)
    }
}
