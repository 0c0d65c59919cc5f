//! Repair and disaster recovery on the server: quarantine (a machine taken
//! out of service but kept, enrolled and reachable, for investigation),
//! forensic bundles, automatic remediation through replacement providers
//! behind a breaker, and zone-loss impact reports.
//!
//! Decisions are pure functions (`remediation::next`, `dr::*`) over stored
//! state; `controller` is the thin loop applying them. Nothing here wipes a
//! machine or touches its disks: a quarantined agent only runs its
//! configured hooks. Nothing here knows tonic: `api::repair` converts.

pub mod controller;
pub mod dr;
pub mod forensics;
pub mod providers;
pub mod remediation;
pub mod settings;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::store::repair::{QuarantineOutcome, QuarantineRecord, ReleaseOutcome, RepairStore};
use crate::store::{MachineRecord, StoreError};
use crate::ServerState;

/// What remediation is doing now, for `flottectl status` (set by the loop).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemediationStatus {
    pub breaker_open: bool,
    pub breaker_reasons: Vec<String>,
    pub in_progress: u32,
}

/// The repair parts of the server state.
pub struct RepairState {
    pub store: Arc<dyn RepairStore>,
    pub forensics: forensics::ForensicStore,
    pub status: Mutex<RemediationStatus>,
}

impl std::fmt::Debug for RepairState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepairState").finish_non_exhaustive()
    }
}

impl RepairState {
    pub fn new(store: Arc<dyn RepairStore>, data_dir: &std::path::Path) -> Self {
        RepairState {
            store,
            forensics: forensics::ForensicStore::new(data_dir),
            status: Mutex::new(RemediationStatus::default()),
        }
    }

    pub fn status(&self) -> RemediationStatus {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_status(&self, status: RemediationStatus) -> RemediationStatus {
        std::mem::replace(
            &mut *self
                .status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            status,
        )
    }
}

/// A fresh quarantine of `machine_id` (its id is what the agent collects a
/// bundle for, once).
pub fn new_quarantine(machine_id: Uuid, reason: String, by: &str, now: i64) -> QuarantineRecord {
    QuarantineRecord {
        machine_id,
        id: Uuid::new_v4().simple().to_string(),
        reason,
        since: now,
        by: by.to_owned(),
    }
}

/// Sends the new desired state (with or without the quarantine) to the
/// machine's agent, if connected; otherwise it gets it on reconnect.
pub async fn announce(state: &ServerState, machine: Option<MachineRecord>) {
    if let Some(machine) = machine {
        crate::api::session::push_desired_state(state, &machine).await;
    }
}

/// The ids of every quarantined machine (what a rollout must skip).
pub async fn quarantined_ids(state: &ServerState) -> Result<HashSet<Uuid>, StoreError> {
    Ok(state
        .repair
        .store
        .quarantines()
        .await?
        .into_iter()
        .map(|quarantine| quarantine.machine_id)
        .collect())
}

/// Quarantines a machine by hand unless it is quarantined already (one
/// conditional store operation), and tells its agent.
pub async fn quarantine(
    state: &ServerState,
    record: &QuarantineRecord,
) -> Result<QuarantineOutcome, StoreError> {
    let outcome = state.repair.store.quarantine_machine(record).await?;
    if let QuarantineOutcome::Quarantined(machine) = &outcome {
        announce(state, Some(machine.as_ref().clone())).await;
    }
    Ok(outcome)
}

/// Releases a quarantined machine (one conditional store operation), and
/// tells its agent.
pub async fn release(state: &ServerState, machine_id: Uuid) -> Result<ReleaseOutcome, StoreError> {
    let outcome = state.repair.store.release_machine(machine_id).await?;
    if let ReleaseOutcome::Released(machine) = &outcome {
        announce(state, Some(machine.as_ref().clone())).await;
    }
    Ok(outcome)
}
