//! SQLite implementation of [`RepairStore`]: tables `quarantines` and
//! `remediation_events` (see `migrations`).

use rusqlite::{params, Connection, Row, Transaction, TransactionBehavior};
use uuid::Uuid;

use super::replicas::fence_holds;
use super::SqliteStore;
use super::{conversion_error, labels_from_json, labels_to_json, machine_from_row, select_one};
use crate::store::repair::{
    QuarantineOutcome, QuarantineRecord, ReleaseOutcome, RemediationEventRecord, RemediationState,
    RepairStore,
};
use crate::store::replicas::Fence;
use crate::store::{MachineRecord, StoreError, UnixSeconds};

fn uuid_from_text(text: &str) -> rusqlite::Result<Uuid> {
    Uuid::parse_str(text).map_err(conversion_error)
}

fn quarantine_from_row(row: &Row<'_>) -> rusqlite::Result<QuarantineRecord> {
    Ok(QuarantineRecord {
        machine_id: uuid_from_text(&row.get::<_, String>("machine_id")?)?,
        id: row.get("id")?,
        reason: row.get("reason")?,
        since: row.get("since")?,
        by: row.get("quarantined_by")?,
    })
}

fn remediation_from_row(row: &Row<'_>) -> rusqlite::Result<RemediationEventRecord> {
    let state: String = row.get("state")?;
    Ok(RemediationEventRecord {
        id: row.get("id")?,
        machine_id: uuid_from_text(&row.get::<_, String>("machine_id")?)?,
        hostname: row.get("hostname")?,
        zone: row.get("zone")?,
        labels: labels_from_json(&row.get::<_, String>("labels")?)?,
        provider: row.get("provider")?,
        state: RemediationState::parse(&state).ok_or_else(|| {
            conversion_error(StoreError::Corrupt(format!(
                "unknown remediation state {state:?}"
            )))
        })?,
        reason: row.get("reason")?,
        opened_at: row.get("opened_at")?,
        updated_at: row.get("updated_at")?,
        token_id: row.get("token_id")?,
        replacement_machine_id: row
            .get::<_, Option<String>>("replacement_machine_id")?
            .map(|text| uuid_from_text(&text))
            .transpose()?,
        detail: row.get("detail")?,
    })
}

const SELECT_QUARANTINE: &str = "SELECT * FROM quarantines WHERE machine_id = ?1";
const SELECT_MACHINE: &str = "SELECT * FROM machines WHERE id = ?1";

/// Bumps a machine's desired-state version inside an open transaction (its
/// agent must be told); the machine as it is now, if any.
fn bump_desired_version(
    transaction: &Transaction<'_>,
    key: &str,
) -> rusqlite::Result<Option<MachineRecord>> {
    let bumped = transaction.execute(
        "UPDATE machines SET desired_version = desired_version + 1 WHERE id = ?1",
        [key],
    )?;
    if bumped == 0 {
        return Ok(None);
    }
    select_one(transaction, SELECT_MACHINE, key, machine_from_row)
}

/// Writes a quarantine and bumps the machine's desired-state version inside
/// an open transaction; the machine as it is now, if any.
fn write_quarantine(
    transaction: &Transaction<'_>,
    record: &QuarantineRecord,
) -> rusqlite::Result<Option<MachineRecord>> {
    let key = record.machine_id.to_string();
    let Some(machine) = bump_desired_version(transaction, &key)? else {
        return Ok(None);
    };
    transaction.execute(
        "INSERT OR REPLACE INTO quarantines (machine_id, id, reason, since, quarantined_by)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![key, record.id, record.reason, record.since, record.by],
    )?;
    Ok(Some(machine))
}

fn upsert_remediation(
    connection: &Connection,
    event: &RemediationEventRecord,
) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT OR REPLACE INTO remediation_events (id, machine_id, hostname, zone, labels,
            provider, state, reason, opened_at, updated_at, token_id, replacement_machine_id, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        params![
            event.id,
            event.machine_id.to_string(),
            event.hostname,
            event.zone,
            labels_to_json(&event.labels),
            event.provider,
            event.state.as_str(),
            event.reason,
            event.opened_at,
            event.updated_at,
            event.token_id,
            event.replacement_machine_id.map(|id| id.to_string()),
            event.detail,
        ],
    )?;
    Ok(())
}

#[async_trait::async_trait]
impl RepairStore for SqliteStore {
    async fn quarantines(&self) -> Result<Vec<QuarantineRecord>, StoreError> {
        self.read_all(
            "SELECT * FROM quarantines ORDER BY since, machine_id",
            quarantine_from_row,
        )
        .await
    }

    async fn quarantine(&self, machine_id: Uuid) -> Result<Option<QuarantineRecord>, StoreError> {
        self.with_connection(move |connection| {
            Ok(select_one(
                connection,
                SELECT_QUARANTINE,
                &machine_id.to_string(),
                quarantine_from_row,
            )?)
        })
        .await
    }

    async fn quarantine_machine(
        &self,
        quarantine: &QuarantineRecord,
    ) -> Result<QuarantineOutcome, StoreError> {
        let quarantine = quarantine.clone();
        self.write(move |connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let key = quarantine.machine_id.to_string();
            if let Some(existing) =
                select_one(&transaction, SELECT_QUARANTINE, &key, quarantine_from_row)?
            {
                return Ok(QuarantineOutcome::AlreadyQuarantined(existing));
            }
            let Some(machine) = write_quarantine(&transaction, &quarantine)? else {
                return Ok(QuarantineOutcome::NoSuchMachine);
            };
            transaction.commit()?;
            Ok(QuarantineOutcome::Quarantined(Box::new(machine)))
        })
        .await
    }

    async fn release_machine(&self, machine_id: Uuid) -> Result<ReleaseOutcome, StoreError> {
        self.write(move |connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let key = machine_id.to_string();
            let removed =
                transaction.execute("DELETE FROM quarantines WHERE machine_id = ?1", [&key])?;
            if removed == 0 {
                let exists = select_one(&transaction, SELECT_MACHINE, &key, |_| Ok(()))?;
                return Ok(match exists {
                    Some(()) => ReleaseOutcome::NotQuarantined,
                    None => ReleaseOutcome::NoSuchMachine,
                });
            }
            let Some(machine) = bump_desired_version(&transaction, &key)? else {
                return Ok(ReleaseOutcome::NoSuchMachine);
            };
            transaction.commit()?;
            Ok(ReleaseOutcome::Released(Box::new(machine)))
        })
        .await
    }

    async fn open_remediation(
        &self,
        quarantine: &QuarantineRecord,
        event: &RemediationEventRecord,
        fence: &Fence,
    ) -> Result<Option<MachineRecord>, StoreError> {
        let quarantine = quarantine.clone();
        let event = event.clone();
        let fence = fence.clone();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            fence_holds(&transaction, &fence)?;
            let machine = write_quarantine(&transaction, &quarantine)?;
            if machine.is_some() {
                upsert_remediation(&transaction, &event)?;
            }
            transaction.commit()?;
            Ok(machine)
        })
        .await
    }

    async fn update_remediation(
        &self,
        event: &RemediationEventRecord,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        let event = event.clone();
        let fence = fence.clone();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            fence_holds(&transaction, &fence)?;
            upsert_remediation(&transaction, &event)?;
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    async fn annotate_open_remediation(
        &self,
        id: &str,
        detail: &str,
        failed: bool,
        at: UnixSeconds,
    ) -> Result<bool, StoreError> {
        let (id, detail) = (id.to_owned(), detail.to_owned());
        self.write(move |connection| {
            let state = if failed {
                RemediationState::Failed
            } else {
                RemediationState::Requested
            };
            let changed = connection.execute(
                "UPDATE remediation_events SET detail = ?2, state = ?3, updated_at = ?4
                 WHERE id = ?1 AND state = ?5",
                params![
                    id,
                    detail,
                    state.as_str(),
                    at,
                    RemediationState::Requested.as_str()
                ],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn remediations(&self) -> Result<Vec<RemediationEventRecord>, StoreError> {
        self.read_all(
            "SELECT * FROM remediation_events ORDER BY opened_at DESC, id DESC",
            remediation_from_row,
        )
        .await
    }
}
