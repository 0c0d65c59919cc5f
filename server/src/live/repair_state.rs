//! What this process holds for repair: the repair store, the forensic
//! bundle store, and what the remediation loop is doing now (for
//! `flottectl status`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::store::repair::RepairStore;
use crate::store::StoreError;
use crate::ServerState;

/// What remediation is doing now, for `flottectl status` (set by the loop).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemediationStatus {
    pub breaker_open: bool,
    pub breaker_reasons: Vec<String>,
    pub breaker_zones: Vec<String>,
    pub in_progress: u32,
}

/// The repair parts of the server state.
pub struct RepairState {
    pub store: Arc<dyn RepairStore>,
    pub forensics: Arc<dyn crate::forensics::ForensicStore>,
    pub status: Mutex<RemediationStatus>,
}

impl std::fmt::Debug for RepairState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepairState").finish_non_exhaustive()
    }
}

impl RepairState {
    pub fn new(
        store: Arc<dyn RepairStore>,
        forensics: Arc<dyn crate::forensics::ForensicStore>,
    ) -> Self {
        RepairState {
            store,
            forensics,
            status: Mutex::new(RemediationStatus::default()),
        }
    }

    pub fn status(&self) -> RemediationStatus {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_status(&self, status: RemediationStatus) -> RemediationStatus {
        std::mem::replace(
            &mut *self
                .status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            status,
        )
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
