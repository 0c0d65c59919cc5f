//! The in-memory side of access: the compiled inputs of the latest policy
//! version (so a connect or a fan-out never reads users and grants from the
//! store), and per machine what it last acknowledged — updated per agent
//! message in memory, written to the store in batches by [`AccessHub::run_flusher`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::access_policy::AccessInputs;
use crate::store::{AccessStore, MachineAccessRecord, StoreError};

/// How often acknowledgements reach the store: at most one transaction per
/// interval, whatever the number of agents acknowledging.
pub const ACK_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is one replace or one map operation: a panic
    // cannot leave the value half-updated.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub struct AccessHub {
    store: Arc<dyn AccessStore>,
    inputs: Mutex<Arc<AccessInputs>>,
    machines: Mutex<HashMap<Uuid, MachineAccessRecord>>,
    dirty: Mutex<HashSet<Uuid>>,
}

impl std::fmt::Debug for AccessHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessHub")
            .field("version", &self.current().version)
            .finish_non_exhaustive()
    }
}

impl AccessHub {
    /// Loads the current policy inputs and every machine's last record.
    pub async fn load(store: Arc<dyn AccessStore>) -> Result<Self, StoreError> {
        let snapshot = store.access_snapshot().await?;
        let machines = store
            .machine_access()
            .await?
            .into_iter()
            .map(|record| (record.machine_id, record))
            .collect();
        Ok(AccessHub {
            store,
            inputs: Mutex::new(Arc::new(AccessInputs::from_snapshot(&snapshot))),
            machines: Mutex::new(machines),
            dirty: Mutex::new(HashSet::new()),
        })
    }

    /// The access store (users, keys, grants, acknowledgements).
    pub fn store(&self) -> &Arc<dyn AccessStore> {
        &self.store
    }

    pub fn current(&self) -> Arc<AccessInputs> {
        Arc::clone(&lock(&self.inputs))
    }

    /// Re-reads the inputs after a committed change. Two changes refreshing
    /// concurrently may finish in any order: an older snapshot never
    /// replaces a newer one.
    pub async fn refresh(&self) -> Result<Arc<AccessInputs>, StoreError> {
        let snapshot = self.store.access_snapshot().await?;
        let fresh = Arc::new(AccessInputs::from_snapshot(&snapshot));
        let mut inputs = lock(&self.inputs);
        if fresh.version > inputs.version {
            *inputs = Arc::clone(&fresh);
        }
        Ok(Arc::clone(&inputs))
    }

    /// Records what an agent reported; it reaches the store with the next
    /// flush if anything but the time changed.
    pub fn record(&self, record: MachineAccessRecord) {
        let machine_id = record.machine_id;
        let changed = {
            let mut machines = lock(&self.machines);
            let previous = machines.get(&machine_id);
            let changed = previous.is_none_or(|previous| {
                previous.applied_version != record.applied_version
                    || previous.missing_logins != record.missing_logins
                    || previous.found != record.found
                    || previous.refused != record.refused
            });
            if changed {
                machines.insert(machine_id, record);
            }
            changed
        };
        if changed {
            lock(&self.dirty).insert(machine_id);
        }
    }

    pub fn machine(&self, machine_id: Uuid) -> Option<MachineAccessRecord> {
        lock(&self.machines).get(&machine_id).cloned()
    }

    pub fn machines(&self) -> HashMap<Uuid, MachineAccessRecord> {
        lock(&self.machines).clone()
    }

    /// Writes every changed record in one transaction.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let dirty: Vec<Uuid> = lock(&self.dirty).drain().collect();
        let records: Vec<MachineAccessRecord> = {
            let machines = lock(&self.machines);
            dirty
                .iter()
                .filter_map(|machine_id| machines.get(machine_id).cloned())
                .collect()
        };
        if let Err(error) = self.store.record_machine_access(&records).await {
            // Retried with the next flush.
            lock(&self.dirty).extend(dirty);
            return Err(error);
        }
        Ok(records.len())
    }

    /// Flushes every [`ACK_FLUSH_INTERVAL`] and once more at shutdown.
    pub async fn run_flusher(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(ACK_FLUSH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            if let Err(error) = self.flush().await {
                tracing::warn!(%error, "access acknowledgements flush failed");
            }
        }
        if let Err(error) = self.flush().await {
            tracing::warn!(%error, "final access acknowledgements flush failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::store::{SqliteStore, UserRecord};

    #[tokio::test]
    async fn acks_reach_the_store_in_batches_and_only_when_they_change() {
        let directory = std::env::temp_dir().join(format!("flotte-hub-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&directory).unwrap();
        let store = Arc::new(SqliteStore::open(&directory.join("flotte.db")).unwrap());
        let hub = AccessHub::load(Arc::clone(&store) as Arc<dyn AccessStore>)
            .await
            .unwrap();
        assert_eq!(hub.current().version, 0);
        let machines: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for machine_id in &machines {
            hub.record(MachineAccessRecord {
                machine_id: *machine_id,
                applied_version: 1,
                applied_at: 10,
                ..MachineAccessRecord::default()
            });
        }
        assert_eq!(hub.flush().await.unwrap(), 3);
        // The same ack again, later: nothing to write.
        hub.record(MachineAccessRecord {
            machine_id: machines[0],
            applied_version: 1,
            applied_at: 20,
            ..MachineAccessRecord::default()
        });
        assert_eq!(hub.flush().await.unwrap(), 0);
        hub.record(MachineAccessRecord {
            machine_id: machines[0],
            applied_version: 2,
            applied_at: 30,
            ..MachineAccessRecord::default()
        });
        assert_eq!(hub.flush().await.unwrap(), 1);
        let stored = store.machine_access().await.unwrap();
        assert_eq!(stored.len(), 3);
        assert!(stored
            .iter()
            .any(|record| record.machine_id == machines[0] && record.applied_version == 2));

        // A committed change is visible after refresh; a reload sees the acks.
        store
            .insert_user(
                &UserRecord {
                    name: "alice".into(),
                    created_at: 1,
                    created_by: "admin".into(),
                    revoked_at: None,
                },
                &[],
            )
            .await
            .unwrap();
        assert_eq!(hub.refresh().await.unwrap().version, 1);
        let reloaded = AccessHub::load(store as Arc<dyn AccessStore>)
            .await
            .unwrap();
        assert_eq!(reloaded.machines().len(), 3);
        assert_eq!(reloaded.current().version, 1);
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
