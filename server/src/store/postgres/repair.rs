//! PostgreSQL implementation of [`RepairStore`]: tables `quarantines` and
//! `remediation_events`. A quarantine or release first locks the machine's
//! row (`SELECT … FOR UPDATE`), so that of two concurrent calls on one
//! machine the second sees what the first wrote.

use deadpool_postgres::Transaction;
use tokio_postgres::Row;
use uuid::Uuid;

use super::machines::machine_from_row;
use super::replicas::fence_holds;
use super::{
    column, corrupt, json_column, labels_to_json, optional_uuid_column, uuid_column, PostgresStore,
};
use crate::store::repair::{
    QuarantineOutcome, QuarantineRecord, ReleaseOutcome, RemediationEventRecord, RemediationState,
    RepairStore,
};
use crate::store::replicas::Fence;
use crate::store::{MachineRecord, StoreError, UnixSeconds};

fn quarantine_from_row(row: &Row) -> Result<QuarantineRecord, StoreError> {
    Ok(QuarantineRecord {
        machine_id: uuid_column(row, "machine_id")?,
        id: column(row, "id")?,
        reason: column(row, "reason")?,
        since: column(row, "since")?,
        by: column(row, "quarantined_by")?,
    })
}

fn remediation_from_row(row: &Row) -> Result<RemediationEventRecord, StoreError> {
    let state: &str = column(row, "state")?;
    Ok(RemediationEventRecord {
        id: column(row, "id")?,
        machine_id: uuid_column(row, "machine_id")?,
        hostname: column(row, "hostname")?,
        zone: column(row, "zone")?,
        labels: json_column(row, "labels")?,
        provider: column(row, "provider")?,
        state: RemediationState::parse(state)
            .ok_or_else(|| corrupt("state", format!("unknown remediation state {state:?}")))?,
        reason: column(row, "reason")?,
        opened_at: column(row, "opened_at")?,
        updated_at: column(row, "updated_at")?,
        token_id: column(row, "token_id")?,
        replacement_machine_id: optional_uuid_column(row, "replacement_machine_id")?,
        detail: column(row, "detail")?,
    })
}

/// Locks the machine's row until the end of `transaction`; whether it exists.
async fn lock_machine(transaction: &Transaction<'_>, key: &str) -> Result<bool, StoreError> {
    Ok(transaction
        .query_opt("SELECT 1 FROM machines WHERE id = $1 FOR UPDATE", &[&key])
        .await?
        .is_some())
}

/// Bumps a machine's desired-state version inside an open transaction (its
/// agent must be told); the machine as it is now, if any.
async fn bump_desired_version(
    transaction: &Transaction<'_>,
    key: &str,
) -> Result<Option<MachineRecord>, StoreError> {
    let row = transaction
        .query_opt(
            "UPDATE machines SET desired_version = desired_version + 1 WHERE id = $1 RETURNING *",
            &[&key],
        )
        .await?;
    row.as_ref().map(machine_from_row).transpose()
}

/// Writes a quarantine (replacing one there) and bumps the machine's
/// desired-state version inside an open transaction; the machine as it is
/// now, if any.
async fn write_quarantine(
    transaction: &Transaction<'_>,
    record: &QuarantineRecord,
) -> Result<Option<MachineRecord>, StoreError> {
    let key = record.machine_id.to_string();
    let Some(machine) = bump_desired_version(transaction, &key).await? else {
        return Ok(None);
    };
    transaction
        .execute(
            "INSERT INTO quarantines (machine_id, id, reason, since, quarantined_by)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (machine_id) DO UPDATE SET id = $2, reason = $3, since = $4,
                quarantined_by = $5",
            &[&key, &record.id, &record.reason, &record.since, &record.by],
        )
        .await?;
    Ok(Some(machine))
}

async fn upsert_remediation<Client: deadpool_postgres::GenericClient + Sync>(
    client: &Client,
    event: &RemediationEventRecord,
) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO remediation_events (id, machine_id, hostname, zone, labels, provider,
                state, reason, opened_at, updated_at, token_id, replacement_machine_id, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (id) DO UPDATE SET machine_id = $2, hostname = $3, zone = $4,
                labels = $5, provider = $6, state = $7, reason = $8, opened_at = $9,
                updated_at = $10, token_id = $11, replacement_machine_id = $12, detail = $13",
            &[
                &event.id,
                &event.machine_id.to_string(),
                &event.hostname,
                &event.zone,
                &labels_to_json(&event.labels)?,
                &event.provider,
                &event.state.as_str(),
                &event.reason,
                &event.opened_at,
                &event.updated_at,
                &event.token_id,
                &event.replacement_machine_id.map(|id| id.to_string()),
                &event.detail,
            ],
        )
        .await?;
    Ok(())
}

const SELECT_QUARANTINE: &str = "SELECT * FROM quarantines WHERE machine_id = $1";

#[async_trait::async_trait]
impl RepairStore for PostgresStore {
    async fn quarantines(&self) -> Result<Vec<QuarantineRecord>, StoreError> {
        self.read_all(
            "SELECT * FROM quarantines ORDER BY since, machine_id",
            &[],
            quarantine_from_row,
        )
        .await
    }

    async fn quarantine(&self, machine_id: Uuid) -> Result<Option<QuarantineRecord>, StoreError> {
        self.read_one(
            SELECT_QUARANTINE,
            &[&machine_id.to_string()],
            quarantine_from_row,
        )
        .await
    }

    async fn quarantine_machine(
        &self,
        quarantine: &QuarantineRecord,
    ) -> Result<QuarantineOutcome, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        let key = quarantine.machine_id.to_string();
        if !lock_machine(&transaction, &key).await? {
            return Ok(QuarantineOutcome::NoSuchMachine);
        }
        if let Some(existing) = transaction.query_opt(SELECT_QUARANTINE, &[&key]).await? {
            return Ok(QuarantineOutcome::AlreadyQuarantined(quarantine_from_row(
                &existing,
            )?));
        }
        let Some(machine) = write_quarantine(&transaction, quarantine).await? else {
            return Ok(QuarantineOutcome::NoSuchMachine);
        };
        transaction.commit().await?;
        Ok(QuarantineOutcome::Quarantined(Box::new(machine)))
    }

    async fn release_machine(&self, machine_id: Uuid) -> Result<ReleaseOutcome, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        let key = machine_id.to_string();
        if !lock_machine(&transaction, &key).await? {
            return Ok(ReleaseOutcome::NoSuchMachine);
        }
        let removed = transaction
            .execute("DELETE FROM quarantines WHERE machine_id = $1", &[&key])
            .await?;
        if removed == 0 {
            return Ok(ReleaseOutcome::NotQuarantined);
        }
        let Some(machine) = bump_desired_version(&transaction, &key).await? else {
            return Ok(ReleaseOutcome::NoSuchMachine);
        };
        transaction.commit().await?;
        Ok(ReleaseOutcome::Released(Box::new(machine)))
    }

    async fn open_remediation(
        &self,
        quarantine: &QuarantineRecord,
        event: &RemediationEventRecord,
        fence: &Fence,
    ) -> Result<Option<MachineRecord>, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        fence_holds(&transaction, fence).await?;
        let machine = write_quarantine(&transaction, quarantine).await?;
        if machine.is_some() {
            upsert_remediation(&transaction, event).await?;
        }
        transaction.commit().await?;
        Ok(machine)
    }

    async fn update_remediation(
        &self,
        event: &RemediationEventRecord,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        fence_holds(&transaction, fence).await?;
        upsert_remediation(&transaction, event).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn annotate_open_remediation(
        &self,
        id: &str,
        detail: &str,
        failed: bool,
        at: UnixSeconds,
    ) -> Result<bool, StoreError> {
        let state = if failed {
            RemediationState::Failed
        } else {
            RemediationState::Requested
        };
        let client = self.client().await?;
        let _write = self.write_timer();
        let changed = client
            .execute(
                "UPDATE remediation_events SET detail = $2, state = $3, updated_at = $4
                 WHERE id = $1 AND state = $5",
                &[
                    &id,
                    &detail,
                    &state.as_str(),
                    &at,
                    &RemediationState::Requested.as_str(),
                ],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn remediations(&self) -> Result<Vec<RemediationEventRecord>, StoreError> {
        self.read_all(
            "SELECT * FROM remediation_events ORDER BY opened_at DESC, id DESC",
            &[],
            remediation_from_row,
        )
        .await
    }
}
