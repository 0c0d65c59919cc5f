//! Quarantine by hand: a machine taken out of service but kept, enrolled and
//! reachable, for investigation. Stored first, then the machine's agent is
//! sent its new desired state by the publisher. Nothing here wipes a machine
//! or touches its disks: a quarantined agent only runs its configured hooks.

use uuid::Uuid;

use crate::store::repair::QuarantineRecord;
use crate::store::{MachineRecord, StoreError};
use crate::ServerState;

/// Quarantines (Some) or releases (None) by hand; the machine as it is now.
pub async fn set_quarantine(
    state: &ServerState,
    machine_id: Uuid,
    quarantine: Option<&QuarantineRecord>,
) -> Result<Option<MachineRecord>, StoreError> {
    let machine = state
        .repair
        .store
        .set_quarantine(machine_id, quarantine)
        .await?;
    if let Some(machine) = &machine {
        state.publisher.machine_changed(machine).await;
    }
    Ok(machine)
}
