//! SQLite implementation of [`RepairStore`]: tables `quarantines` and
//! `remediation_events` (see `migrations`).

use rusqlite::{params, Connection, Row};
use uuid::Uuid;

use super::SqliteStore;
use super::{conversion_error, labels_from_json, labels_to_json, machine_from_row, select_one};
use crate::store::repair::{
    QuarantineRecord, RemediationEventRecord, RemediationState, RepairStore,
};
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

/// Writes (or removes) a quarantine and bumps the machine's desired-state
/// version inside an open transaction; the machine as it is now, if any.
fn write_quarantine(
    transaction: &rusqlite::Transaction<'_>,
    machine_id: Uuid,
    quarantine: Option<&QuarantineRecord>,
) -> rusqlite::Result<Option<MachineRecord>> {
    let key = machine_id.to_string();
    let bumped = transaction.execute(
        "UPDATE machines SET desired_version = desired_version + 1 WHERE id = ?1",
        [&key],
    )?;
    if bumped == 0 {
        return Ok(None);
    }
    match quarantine {
        Some(record) => transaction.execute(
            "INSERT OR REPLACE INTO quarantines (machine_id, id, reason, since, quarantined_by)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key, record.id, record.reason, record.since, record.by],
        )?,
        None => transaction.execute("DELETE FROM quarantines WHERE machine_id = ?1", [&key])?,
    };
    select_one(
        transaction,
        "SELECT * FROM machines WHERE id = ?1",
        &key,
        machine_from_row,
    )
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
                "SELECT * FROM quarantines WHERE machine_id = ?1",
                &machine_id.to_string(),
                quarantine_from_row,
            )?)
        })
        .await
    }

    async fn set_quarantine(
        &self,
        machine_id: Uuid,
        quarantine: Option<&QuarantineRecord>,
    ) -> Result<Option<MachineRecord>, StoreError> {
        let quarantine = quarantine.cloned();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            let machine = write_quarantine(&transaction, machine_id, quarantine.as_ref())?;
            transaction.commit()?;
            Ok(machine)
        })
        .await
    }

    async fn open_remediation(
        &self,
        quarantine: &QuarantineRecord,
        event: &RemediationEventRecord,
    ) -> Result<Option<MachineRecord>, StoreError> {
        let quarantine = quarantine.clone();
        let event = event.clone();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            let machine = write_quarantine(&transaction, event.machine_id, Some(&quarantine))?;
            if machine.is_some() {
                upsert_remediation(&transaction, &event)?;
            }
            transaction.commit()?;
            Ok(machine)
        })
        .await
    }

    async fn update_remediation(&self, event: &RemediationEventRecord) -> Result<(), StoreError> {
        let event = event.clone();
        self.write(move |connection| Ok(upsert_remediation(connection, &event)?))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::{Inventory, Store};

    fn machine(id: Uuid) -> MachineRecord {
        MachineRecord {
            id,
            labels: [("role".to_owned(), "web".to_owned())].into(),
            zone: "dc1".into(),
            enrolled_at: 1,
            enrolled_with_token: "t".into(),
            certificate_serial: "01".into(),
            previous_certificate_serial: String::new(),
            certificate_not_after: 9,
            inventory: Inventory::default(),
            last_seen: 1,
            desired_version: 1,
            state: "unknown".into(),
            state_reason: String::new(),
            state_since: 0,
            retired_at: None,
            desired_image: None,
        }
    }

    fn event(id: &str, machine_id: Uuid, opened_at: i64) -> RemediationEventRecord {
        RemediationEventRecord {
            id: id.into(),
            machine_id,
            hostname: "web-1".into(),
            zone: "dc1".into(),
            labels: BTreeMap::new(),
            provider: "local".into(),
            state: RemediationState::Requested,
            reason: "down".into(),
            opened_at,
            updated_at: opened_at,
            token_id: "tok".into(),
            replacement_machine_id: None,
            detail: String::new(),
        }
    }

    #[tokio::test]
    async fn quarantines_and_remediation_events_round_trip() {
        let dir = std::env::temp_dir().join(format!("flotte-repair-store-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(&dir.join("flotte.db")).unwrap();
        let id = Uuid::new_v4();
        store.insert_machine(&machine(id)).await.unwrap();
        let quarantine = QuarantineRecord {
            machine_id: id,
            id: "q1".into(),
            reason: "disk".into(),
            since: 10,
            by: "bob".into(),
        };
        let updated = store
            .set_quarantine(id, Some(&quarantine))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(updated.desired_version, 2, "the agent must be told");
        assert_eq!(
            store.quarantine(id).await.unwrap(),
            Some(quarantine.clone())
        );
        assert!(store
            .set_quarantine(Uuid::new_v4(), Some(&quarantine))
            .await
            .unwrap()
            .is_none());
        let released = store.set_quarantine(id, None).await.unwrap().unwrap();
        assert_eq!(released.desired_version, 3);
        assert!(store.quarantines().await.unwrap().is_empty());

        // Opening a remediation quarantines and records together.
        store
            .open_remediation(&quarantine, &event("e1", id, 100))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(store.quarantines().await.unwrap().len(), 1);
        store
            .open_remediation(&quarantine, &event("e2", id, 200))
            .await
            .unwrap();
        let events = store.remediations().await.unwrap();
        assert_eq!(
            events
                .iter()
                .map(|event| event.id.as_str())
                .collect::<Vec<_>>(),
            ["e2", "e1"],
            "newest first"
        );
        // A provider's late answer never reopens a closed event.
        let closed = RemediationEventRecord {
            state: RemediationState::Closed,
            replacement_machine_id: Some(Uuid::new_v4()),
            ..event("e1", id, 100)
        };
        store.update_remediation(&closed).await.unwrap();
        assert!(!store
            .annotate_open_remediation("e1", "late", true, 300)
            .await
            .unwrap());
        assert!(store
            .annotate_open_remediation("e2", "quota exceeded", true, 300)
            .await
            .unwrap());
        let events = store.remediations().await.unwrap();
        assert_eq!(events[0].state, RemediationState::Failed);
        assert_eq!(events[0].detail, "quota exceeded");
        assert_eq!(events[1], closed);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
