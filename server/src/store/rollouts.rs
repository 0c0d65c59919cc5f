//! The rollout part of the durable store: rollouts and each machine's place
//! and progress in one, behind its own trait so that the main `Store` trait
//! stays as it is.

use uuid::Uuid;

use super::replicas::Fence;
use super::{DesiredImageRecord, MachineRecord, StoreError};
use crate::domain::rollout::{Rollout, RolloutMachine};

/// The outcome of storing a new rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutCreation {
    Inserted,
    /// Refused, nothing written: `machines` (in the order given) are held
    /// by the active rollout `rollout` (the lowest id if several).
    Overlap {
        rollout: Uuid,
        machines: Vec<Uuid>,
    },
}

#[async_trait::async_trait]
pub trait RolloutStore: Send + Sync + 'static {
    /// Stores a new rollout with all its machines, atomically, unless one
    /// of its machines is in an active (not finished) rollout: checked in
    /// the same transaction, so two creations cannot both take a machine.
    async fn insert_rollout(
        &self,
        rollout: &Rollout,
        machines: &[RolloutMachine],
    ) -> Result<RolloutCreation, StoreError>;
    /// Every rollout, newest first.
    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError>;
    async fn rollout(&self, id: Uuid) -> Result<Option<Rollout>, StoreError>;
    /// The machines of a rollout, in wave order.
    async fn rollout_machines(&self, id: Uuid) -> Result<Vec<RolloutMachine>, StoreError>;
    /// The rows of rollout `id` for `machines` only (no particular order):
    /// what another replica re-reads after a pass that changed them.
    async fn rollout_machines_with_ids(
        &self,
        id: Uuid,
        machines: &[Uuid],
    ) -> Result<Vec<RolloutMachine>, StoreError>;
    /// Stores one pass of the controller atomically: the rollout row, the
    /// machine rows that changed, and the desired images to set (each bumps
    /// the machine's desired-state version). Returns the updated records of
    /// the machines in `desired`, to push to their agents.
    ///
    /// Conditional twice over: the stored row must still be at
    /// `rollout.revision` (it becomes `revision + 1`), else
    /// [`StoreError::Conflict`] — another replica changed it; and a
    /// leader-only write carries its `fence`, refused with
    /// [`StoreError::Fenced`] once the lease is gone. Nothing is written
    /// when either fails.
    async fn apply_rollout_pass(
        &self,
        rollout: &Rollout,
        machines: &[RolloutMachine],
        desired: &[(Uuid, DesiredImageRecord)],
        fence: Option<&Fence>,
    ) -> Result<Vec<MachineRecord>, StoreError>;
}

/// The refusal of a write made from a stale copy of `rollout`.
pub(super) fn stale_revision(rollout: &Rollout) -> StoreError {
    StoreError::Conflict(format!(
        "rollout {} changed since revision {} was read",
        rollout.id, rollout.revision
    ))
}
