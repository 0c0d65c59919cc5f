//! What a machine must look like, as the agent is told: the one domain type
//! the publisher builds and the session edge turns into its wire form.
//!
//! Pure: built from stored records only, so that every process (and, with
//! replicas, every replica) builds the same state from the same rows.

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use crate::domain::access_policy::MachinePolicy;
use crate::store::repair::QuarantineRecord;
use crate::store::{ImageRecord, MachineRecord};

/// A machine's whole desired state, sent on connect and on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    /// Bumped by the store at every change; the agent acks it.
    pub version: u64,
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    pub report_interval: Duration,
    pub image: Option<DesiredImage>,
    pub quarantine: Option<QuarantineRecord>,
    /// Access travels with every desired state, so a machine that was away
    /// gets the current policy on reconnect, before anything else.
    pub access: Option<MachinePolicy>,
}

/// The image a machine must run, with what the agent needs to verify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredImage {
    pub image: ImageRecord,
    /// A downgrade the operator asked for explicitly.
    pub rollback: bool,
    /// The rollout that set it, when one did (shown in the agent's logs).
    pub rollout_id: Option<Uuid>,
}

/// The desired state of `machine` given the record of its desired image (if
/// it has one); quarantine and access are filled in by the publisher.
pub fn desired_state(
    machine: &MachineRecord,
    image: Option<&ImageRecord>,
    report_interval: Duration,
) -> DesiredState {
    let rollback = machine
        .desired_image
        .as_ref()
        .is_some_and(|desired| desired.rollback);
    DesiredState {
        version: machine.desired_version,
        labels: machine.labels.clone(),
        zone: machine.zone.clone(),
        report_interval,
        image: image.map(|image| DesiredImage {
            image: image.clone(),
            rollback,
            rollout_id: None,
        }),
        quarantine: None,
        access: None,
    }
}
