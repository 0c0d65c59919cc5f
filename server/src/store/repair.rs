//! The repair part of the store, behind its own trait so that it grows
//! without touching [`super::Store`]: quarantines (kept with the machine,
//! so a rollout controller can skip quarantined machines) and remediation
//! events.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::replicas::Fence;

use super::{MachineRecord, StoreError, UnixSeconds};

/// A machine taken out of service but kept for investigation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRecord {
    pub machine_id: Uuid,
    /// Unique per quarantine: the agent collects one bundle per id.
    pub id: String,
    pub reason: String,
    pub since: UnixSeconds,
    /// Operator name, or `remediation`.
    pub by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemediationState {
    /// Quarantined, replacement asked of the provider, not operational yet.
    Requested,
    /// The replacement enrolled with the same labels and zone and turned operational.
    Closed,
    /// The provider failed or the replacement was not operational in time.
    Failed,
}

impl RemediationState {
    pub fn as_str(self) -> &'static str {
        match self {
            RemediationState::Requested => "requested",
            RemediationState::Closed => "closed",
            RemediationState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            RemediationState::Requested,
            RemediationState::Closed,
            RemediationState::Failed,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }
}

/// One automatic remediation: a machine quarantined and a replacement asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemediationEventRecord {
    pub id: String,
    pub machine_id: Uuid,
    pub hostname: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub provider: String,
    pub state: RemediationState,
    pub reason: String,
    pub opened_at: UnixSeconds,
    pub updated_at: UnixSeconds,
    /// The join token given to the provider: the replacement is the machine
    /// that enrolled with it.
    pub token_id: String,
    pub replacement_machine_id: Option<Uuid>,
    /// What the provider said, or why the event failed.
    pub detail: String,
}

/// The outcome of [`RepairStore::quarantine_machine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuarantineOutcome {
    /// Quarantined now; the machine as it is now, to push to its agent.
    Quarantined(Box<MachineRecord>),
    /// Nothing written: this quarantine was there first.
    AlreadyQuarantined(QuarantineRecord),
    NoSuchMachine,
}

/// The outcome of [`RepairStore::release_machine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Released now; the machine as it is now, to push to its agent.
    Released(Box<MachineRecord>),
    NotQuarantined,
    NoSuchMachine,
}

#[async_trait::async_trait]
pub trait RepairStore: Send + Sync + 'static {
    async fn quarantines(&self) -> Result<Vec<QuarantineRecord>, StoreError>;
    async fn quarantine(&self, machine_id: Uuid) -> Result<Option<QuarantineRecord>, StoreError>;
    /// Quarantines a machine unless it is quarantined already (the first
    /// quarantine stands), bumping its desired-state version: one
    /// conditional operation, so that two concurrent calls quarantine once.
    async fn quarantine_machine(
        &self,
        quarantine: &QuarantineRecord,
    ) -> Result<QuarantineOutcome, StoreError>;
    /// Releases a quarantined machine and bumps its desired-state version,
    /// in one conditional operation.
    async fn release_machine(&self, machine_id: Uuid) -> Result<ReleaseOutcome, StoreError>;
    /// Quarantines the event's machine and records the event, atomically;
    /// `None` if no such machine. The remediation loop leads: its `fence`
    /// must still hold (else [`StoreError::Fenced`], nothing written).
    async fn open_remediation(
        &self,
        quarantine: &QuarantineRecord,
        event: &RemediationEventRecord,
        fence: &Fence,
    ) -> Result<Option<MachineRecord>, StoreError>;
    /// Closes or fails an event, under the remediation loop's `fence`.
    async fn update_remediation(
        &self,
        event: &RemediationEventRecord,
        fence: &Fence,
    ) -> Result<(), StoreError>;
    /// Records a provider's answer on a still-open event (failing it if
    /// `failed`); an event closed meanwhile is left as it is. `false` if
    /// the event was not open.
    async fn annotate_open_remediation(
        &self,
        id: &str,
        detail: &str,
        failed: bool,
        at: UnixSeconds,
    ) -> Result<bool, StoreError>;
    /// Every remediation event, newest first.
    async fn remediations(&self) -> Result<Vec<RemediationEventRecord>, StoreError>;
}
