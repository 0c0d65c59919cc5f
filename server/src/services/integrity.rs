//! Image integrity: asking machines to verify (or restore) the image they
//! run, keeping each machine's last verification, and listing them. The
//! verification itself happens on the agent; the server only asks, stores
//! the answer (one write per verification, never per report) and shows it.
//! A drifted machine's state follows its reports (`domain::health`), not
//! this module.

use flotte_proto::labels::Selector;
use uuid::Uuid;

use crate::services::machines::{find_machine_in_service, MachineError};
use crate::store::integrity::ImageVerificationRecord;
use crate::store::{MachineRecord, StoreError};
use crate::ServerState;

#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("selector {selector:?}: {reason}")]
    BadSelector { selector: String, reason: String },
    #[error("no machine in service matches the selector {0:?}")]
    NoneSelected(String),
    #[error("machine {0} is not connected: it cannot be asked now")]
    NotConnected(Uuid),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One machine a request went to (or could not go to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskedMachine {
    pub machine_id: Uuid,
    pub hostname: String,
    /// False when the machine has no session (or its queue is full).
    pub sent: bool,
}

/// A selector `text` would be read as (it has an operator: `=`, `!` or a
/// value set's `(`), or `None` for a machine's id, id prefix or hostname
/// (which never hold those; a bare `key` is read as a hostname here).
fn selector_of(text: &str) -> Result<Option<Selector>, IntegrityError> {
    if !text.contains(['=', '!', '(']) {
        return Ok(None);
    }
    Selector::parse(text)
        .map(Some)
        .map_err(|error| bad_selector(text, &error))
}

fn bad_selector(text: &str, error: &flotte_proto::labels::LabelError) -> IntegrityError {
    IntegrityError::BadSelector {
        selector: text.chars().take(64).collect(),
        reason: error.to_string(),
    }
}

fn selected<'a>(
    machines: &'a [MachineRecord],
    selector: &'a Selector,
) -> impl Iterator<Item = &'a MachineRecord> {
    machines.iter().filter(move |machine| {
        machine.retired_at.is_none()
            && selector.matches(
                |key| machine.labels.get(key).map(String::as_str),
                &machine.zone,
            )
    })
}

/// Sends `restore`/verify with `request_id` to the machine's session,
/// whichever replica holds it; false when none does (the caller says so).
async fn ask(state: &ServerState, machine_id: Uuid, request_id: &str, restore: bool) -> bool {
    state
        .publisher
        .image_command(machine_id, request_id.to_owned(), restore)
        .await
}

/// Asks every machine `target` names (id, id prefix, hostname or selector)
/// to verify its image now; the request id its answers will carry, and to
/// whom it went.
pub async fn ask_verification(
    state: &ServerState,
    target: &str,
) -> Result<(String, Vec<AskedMachine>), IntegrityError> {
    let machines = state.store.machines().await?;
    let selector = selector_of(target)?;
    let chosen: Vec<&MachineRecord> = match &selector {
        Some(selector) => selected(&machines, selector).collect(),
        None => vec![find_machine_in_service(&machines, target)?],
    };
    if chosen.is_empty() {
        return Err(IntegrityError::NoneSelected(
            target.chars().take(64).collect(),
        ));
    }
    let request_id = Uuid::new_v4().to_string();
    let mut asked = Vec::with_capacity(chosen.len());
    for machine in chosen {
        asked.push(AskedMachine {
            machine_id: machine.id,
            hostname: machine.inventory.hostname.clone(),
            sent: ask(state, machine.id, &request_id, false).await,
        });
    }
    Ok((request_id, asked))
}

/// Asks one connected machine to re-create its image tree from the signed
/// payload (then verify it); the machine and the request id of the answer.
pub async fn ask_restore(
    state: &ServerState,
    key: &str,
) -> Result<(MachineRecord, String), IntegrityError> {
    let machines = state.store.machines().await?;
    let machine = find_machine_in_service(&machines, key)?.clone();
    let request_id = Uuid::new_v4().to_string();
    if !ask(state, machine.id, &request_id, true).await {
        return Err(IntegrityError::NotConnected(machine.id));
    }
    Ok((machine, request_id))
}

/// Keeps a machine's latest verification (bounded by the session edge).
pub async fn record(
    state: &ServerState,
    verification: &ImageVerificationRecord,
) -> Result<bool, StoreError> {
    state.integrity.record_verification(verification).await
}

/// The last verification of each machine the filters choose, with its
/// hostname: `selector` (empty: all), `machine_ids` (empty: all), and only
/// those that drifted or could not be verified if `drift_only`.
pub async fn list(
    state: &ServerState,
    selector: &str,
    machine_ids: &[String],
    drift_only: bool,
) -> Result<Vec<(ImageVerificationRecord, String)>, IntegrityError> {
    let selector = if selector.is_empty() {
        Selector::default()
    } else {
        // Here the text can only be a selector, so every form is read as one.
        Selector::parse(selector).map_err(|error| bad_selector(selector, &error))?
    };
    let machines = state.store.machines().await?;
    let wanted: Vec<(Uuid, String)> = selected(&machines, &selector)
        .filter(|machine| {
            machine_ids.is_empty() || machine_ids.iter().any(|id| *id == machine.id.to_string())
        })
        .map(|machine| (machine.id, machine.inventory.hostname.clone()))
        .collect();
    Ok(state
        .integrity
        .verifications()
        .await?
        .into_iter()
        // An image that could not be verified is listed with the drifted ones.
        .filter(|record| !drift_only || record.result != "clean")
        .filter_map(|record| {
            let hostname = wanted
                .iter()
                .find(|(id, _)| *id == record.machine_id)?
                .1
                .clone();
            Some((record, hostname))
        })
        .collect())
}
