//! Quarantine by hand: a machine taken out of service but kept, enrolled and
//! reachable, for investigation. Stored first, then the machine's agent is
//! sent its new desired state by the publisher. Nothing here wipes a machine
//! or touches its disks: a quarantined agent only runs its configured hooks.

use uuid::Uuid;

use crate::domain::repair::new_quarantine;
use crate::services::machines::{self, MachineError};
use crate::store::repair::{QuarantineOutcome, QuarantineRecord, ReleaseOutcome};
use crate::store::{MachineRecord, StoreError};
use crate::ServerState;

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("machine {0} is not quarantined")]
    NotQuarantined(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An operator quarantines the machine `key` names (`reason` empty: "by
/// ACTOR"). Already quarantined: the first quarantine stands and is returned.
pub async fn quarantine_by_hand(
    state: &ServerState,
    key: &str,
    reason: &str,
    actor: &str,
) -> Result<(MachineRecord, QuarantineRecord), QuarantineError> {
    let machine = machines::resolve_in_service(state, key).await?;
    let reason = match reason.trim() {
        "" => format!("quarantined by {actor}"),
        reason => reason.to_owned(),
    };
    let record = new_quarantine(machine.id, reason, actor, state.clock.now_unix());
    let record = match quarantine(state, &record).await? {
        QuarantineOutcome::Quarantined(_) => {
            tracing::warn!(machine = %machine.id, %actor, reason = %record.reason, "machine quarantined");
            record
        }
        QuarantineOutcome::AlreadyQuarantined(existing) => existing,
        QuarantineOutcome::NoSuchMachine => return Err(MachineError::Removed(machine.id).into()),
    };
    Ok((machine, record))
}

/// An operator releases the machine `key` names from its quarantine.
pub async fn release_by_hand(
    state: &ServerState,
    key: &str,
    actor: &str,
) -> Result<MachineRecord, QuarantineError> {
    let machine = machines::resolve(state, key).await?;
    match release(state, machine.id).await? {
        ReleaseOutcome::Released(_) => {
            tracing::info!(machine = %machine.id, %actor, "machine released from quarantine");
            Ok(machine)
        }
        _ => Err(QuarantineError::NotQuarantined(
            machine.inventory.hostname.clone(),
        )),
    }
}

/// Quarantines a machine by hand unless it is quarantined already (one
/// conditional store operation), and sends its agent the new desired state.
async fn quarantine(
    state: &ServerState,
    record: &QuarantineRecord,
) -> Result<QuarantineOutcome, StoreError> {
    let outcome = state.repair.store.quarantine_machine(record).await?;
    if let QuarantineOutcome::Quarantined(machine) = &outcome {
        state.publisher.machine_changed(machine).await;
    }
    Ok(outcome)
}

/// Releases a quarantined machine (one conditional store operation), and
/// sends its agent the new desired state.
async fn release(state: &ServerState, machine_id: Uuid) -> Result<ReleaseOutcome, StoreError> {
    let outcome = state.repair.store.release_machine(machine_id).await?;
    if let ReleaseOutcome::Released(machine) = &outcome {
        state.publisher.machine_changed(machine).await;
    }
    Ok(outcome)
}
