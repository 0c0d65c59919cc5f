//! Quarantine by hand: a machine taken out of service but kept, enrolled and
//! reachable, for investigation. Stored first, then the machine's agent is
//! sent its new desired state by the publisher. Nothing here wipes a machine
//! or touches its disks: a quarantined agent only runs its configured hooks.

use uuid::Uuid;

use crate::store::repair::{QuarantineOutcome, QuarantineRecord, ReleaseOutcome};
use crate::store::StoreError;
use crate::ServerState;

/// Quarantines a machine by hand unless it is quarantined already (one
/// conditional store operation), and sends its agent the new desired state.
pub async fn quarantine(
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
pub async fn release(state: &ServerState, machine_id: Uuid) -> Result<ReleaseOutcome, StoreError> {
    let outcome = state.repair.store.release_machine(machine_id).await?;
    if let ReleaseOutcome::Released(machine) = &outcome {
        state.publisher.machine_changed(machine).await;
    }
    Ok(outcome)
}
