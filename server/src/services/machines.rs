//! Machines: how an operator's word names one (id, id prefix or hostname),
//! relabelling, setting a desired image, decommissioning, and the fleet's
//! state counts. Every change is stored first and then handed to the
//! publisher, which sends the machine its new desired state.

use std::collections::{BTreeMap, HashMap};

use flotte_common::roles::Role;
use flotte_proto::identity::Identity;
use flotte_proto::image::ImageReference;
use flotte_proto::labels::validate_label;
use uuid::Uuid;

use crate::domain::access_policy::grants_changed_by_relabel;
use crate::domain::health::MachineState;
use crate::domain::rollout::{downgrade_from, rollback_image};
use crate::live::feed::Change;
use crate::live::health::TrackedMachine;
use crate::live::revocation::{denial, REVOCATION_GRACE};
use crate::store::{DeniedKind, DesiredImageRecord, MachineRecord, StoreError};
use crate::ServerState;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("no machine with id {0}")]
    NoSuchId(String),
    #[error("no machine matches {0:?} (id, id prefix or hostname)")]
    NoMatch(String),
    #[error("{key:?} matches {count} machines; use more of the id")]
    Ambiguous { key: String, count: usize },
    #[error("machine {0} was decommissioned")]
    Retired(Uuid),
    #[error("machine {id} was already decommissioned at {}", crate::store::rfc3339(*.at))]
    AlreadyRetired { id: Uuid, at: i64 },
    #[error("machine {0} was removed")]
    Removed(Uuid),
    /// Every invalid label, together.
    #[error("{}", .0.join("; "))]
    InvalidLabels(Vec<String>),
    #[error("{0}")]
    InvalidImage(String),
    /// An operator may relabel, but not move a machine into or out of a
    /// grant: that is granting or revoking SSH access, an admin's call.
    #[error("relabelling machine {machine} would change who can log in to it (grants {}): only an admin may do that", .grants.join(", "))]
    RelabelChangesAccess { machine: Uuid, grants: Vec<String> },
    #[error("no image {0}: push it first")]
    NoSuchImage(String),
    #[error("machine {machine} runs {running}; {wanted} is older: a downgrade must be asked for with --rollback")]
    Downgrade {
        machine: String,
        running: String,
        wanted: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Finds a machine by full id, unique id prefix, or unique hostname.
pub fn find_machine<'a>(
    machines: &'a [MachineRecord],
    key: &str,
) -> Result<&'a MachineRecord, MachineError> {
    if let Ok(id) = Uuid::parse_str(key) {
        return machines
            .iter()
            .find(|machine| machine.id == id)
            .ok_or_else(|| MachineError::NoSuchId(key.to_owned()));
    }
    let matches: Vec<_> = machines
        .iter()
        .filter(|machine| {
            machine.id.to_string().starts_with(key) || machine.inventory.hostname == key
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(MachineError::NoMatch(key.to_owned())),
        many => Err(MachineError::Ambiguous {
            key: key.to_owned(),
            count: many.len(),
        }),
    }
}

/// [`find_machine`], refusing a decommissioned machine: what every call that
/// changes a machine needs (a retired machine never comes back).
pub fn find_machine_in_service<'a>(
    machines: &'a [MachineRecord],
    key: &str,
) -> Result<&'a MachineRecord, MachineError> {
    let machine = find_machine(machines, key)?;
    if machine.retired_at.is_some() {
        return Err(MachineError::Retired(machine.id));
    }
    Ok(machine)
}

/// The stored machine an operator's `key` names.
pub async fn resolve(state: &ServerState, key: &str) -> Result<MachineRecord, MachineError> {
    let machines = state.store.machines().await?;
    find_machine(&machines, key).cloned()
}

/// [`resolve`], refusing a decommissioned machine.
pub async fn resolve_in_service(
    state: &ServerState,
    key: &str,
) -> Result<MachineRecord, MachineError> {
    let machines = state.store.machines().await?;
    find_machine_in_service(&machines, key).cloned()
}

/// Applies `set` then `remove` to `labels`, listing every invalid label.
pub fn relabel(
    labels: &BTreeMap<String, String>,
    set: &HashMap<String, String>,
    remove: &[String],
) -> Result<BTreeMap<String, String>, MachineError> {
    let problems: Vec<String> = set
        .iter()
        .filter_map(|(key, value)| validate_label(key, value).err())
        .map(|error| error.to_string())
        .collect();
    if !problems.is_empty() {
        return Err(MachineError::InvalidLabels(problems));
    }
    let mut labels = labels.clone();
    labels.extend(set.iter().map(|(key, value)| (key.clone(), value.clone())));
    for key in remove {
        labels.remove(key);
    }
    Ok(labels)
}

/// Changes a machine's labels and sends it its new desired state. A change
/// that moves the machine into or out of a grant's selector needs
/// `Role::Admin` (the role that grants access), whatever role may relabel.
pub async fn set_labels(
    state: &ServerState,
    key: &str,
    set: &HashMap<String, String>,
    remove: &[String],
    role: Role,
) -> Result<MachineRecord, MachineError> {
    let machine = resolve_in_service(state, key).await?;
    let labels = relabel(&machine.labels, set, remove)?;
    if role < Role::Admin {
        let grants = grants_changed_by_relabel(
            &state.access.current(),
            &machine.zone,
            &machine.labels,
            &labels,
            state.clock.now_unix(),
        );
        if !grants.is_empty() {
            return Err(MachineError::RelabelChangesAccess {
                machine: machine.id,
                grants,
            });
        }
    }
    let updated = state
        .store
        .update_labels(machine.id, &labels)
        .await?
        .ok_or(MachineError::Removed(machine.id))?;
    state.health.upsert(&updated, state.clock.now_unix());
    state.publisher.machine_changed(&updated).await;
    Ok(updated)
}

/// Sets the image a machine must run (`rollback` allows a downgrade) and
/// sends it its new desired state.
pub async fn set_image(
    state: &ServerState,
    key: &str,
    reference: &str,
    rollback: bool,
) -> Result<MachineRecord, MachineError> {
    let wanted: ImageReference =
        reference
            .parse()
            .map_err(|error: flotte_proto::image::ImageError| {
                MachineError::InvalidImage(error.to_string())
            })?;
    let image = state
        .store
        .image(&wanted.name, &wanted.version.to_string())
        .await?
        .ok_or_else(|| MachineError::NoSuchImage(wanted.to_string()))?;
    let machine = resolve_in_service(state, key).await?;
    if !rollback {
        let running = rollback_image(
            state
                .health
                .get(machine.id)
                .and_then(|tracked| tracked.last_report)
                .as_ref()
                .and_then(|report| report.current_image()),
            machine.desired_image.as_ref(),
        );
        if let Some(running) = downgrade_from(running.as_ref(), &wanted.name, &wanted.version) {
            return Err(MachineError::Downgrade {
                machine: machine.inventory.hostname.clone(),
                running,
                wanted: wanted.to_string(),
            });
        }
    }
    let desired = DesiredImageRecord {
        name: image.name.clone(),
        version: image.version.clone(),
        digest: image.digest.clone(),
        rollback,
    };
    let updated = state
        .store
        .set_desired_image(machine.id, Some(&desired))
        .await?
        .ok_or(MachineError::Removed(machine.id))?;
    tracing::info!(machine = %updated.id, image = %wanted, version = updated.desired_version, "desired image set");
    state.publisher.machine_changed(&updated).await;
    Ok(updated)
}

/// Retires a machine: marked retired and its identity and serials denied in
/// one store operation, then refused in memory, told why on its session, and
/// its connections closed.
pub async fn decommission(
    state: &ServerState,
    key: &str,
    operator: &str,
) -> Result<MachineRecord, MachineError> {
    let machine = resolve(state, key).await?;
    if let Some(at) = machine.retired_at {
        return Err(MachineError::AlreadyRetired { id: machine.id, at });
    }
    let now = state.clock.now_unix();
    let identity_uri = Identity::machine(&state.config.trust_domain, machine.id).uri();
    let reason = format!(
        "machine {} ({}) was decommissioned by {operator}",
        machine.id, machine.inventory.hostname
    );
    let denied = denial(
        &reason,
        now,
        [
            (DeniedKind::Identity, identity_uri.clone()),
            (DeniedKind::Serial, machine.certificate_serial.clone()),
            (
                DeniedKind::Serial,
                machine.previous_certificate_serial.clone(),
            ),
        ],
    );
    let retired = state
        .store
        .retire_machine(machine.id, now, &denied)
        .await?
        .ok_or(MachineError::Removed(machine.id))?;
    // Refused from now on (a reconnect fails at the handshake); the agent is
    // told why on its session before the connection goes, and logs it.
    state
        .revocations
        .enforce(&denied, &identity_uri, REVOCATION_GRACE);
    state
        .feed
        .announce(Change::Denied {
            identity_uri: identity_uri.clone(),
        })
        .await;
    state
        .publisher
        .refuse_session(machine.id, reason.clone())
        .await;
    state.health.retire(machine.id, &reason, now);
    tracing::warn!(machine = %machine.id, %operator, "machine decommissioned");
    Ok(retired)
}

/// Machines per state, in the canonical state order, for one named group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCounts {
    pub name: String,
    pub machines: u32,
    pub states: Vec<(MachineState, u32)>,
}

/// The fleet's counts, per zone and per value of the label `by` (if given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetCounts {
    pub fleet: GroupCounts,
    pub zones: Vec<GroupCounts>,
    pub groups: Vec<GroupCounts>,
}

fn group_counts<'a>(name: &str, machines: impl Iterator<Item = &'a TrackedMachine>) -> GroupCounts {
    let mut counts: HashMap<MachineState, u32> = HashMap::new();
    let mut total = 0u32;
    for machine in machines {
        *counts.entry(machine.state).or_default() += 1;
        total += 1;
    }
    GroupCounts {
        name: name.to_owned(),
        machines: total,
        states: MachineState::ALL
            .into_iter()
            .filter_map(|state| counts.get(&state).map(|count| (state, *count)))
            .collect(),
    }
}

/// Fleet, per-zone and per-label-value state counts.
pub fn fleet_counts(machines: &[TrackedMachine], by: &str) -> FleetCounts {
    let group_of = |machine: &TrackedMachine| -> String {
        machine
            .labels
            .get(by)
            .map_or("(none)", String::as_str)
            .to_owned()
    };
    let mut zones: Vec<&str> = machines
        .iter()
        .map(|machine| machine.zone.as_str())
        .collect();
    zones.sort_unstable();
    zones.dedup();
    let mut groups: Vec<String> = Vec::new();
    if !by.is_empty() {
        groups = machines.iter().map(group_of).collect();
        groups.sort_unstable();
        groups.dedup();
    }
    FleetCounts {
        fleet: group_counts("fleet", machines.iter()),
        zones: zones
            .into_iter()
            .map(|zone| group_counts(zone, machines.iter().filter(|machine| machine.zone == zone)))
            .collect(),
        groups: groups
            .iter()
            .map(|group| {
                group_counts(
                    group,
                    machines
                        .iter()
                        .filter(|machine| &group_of(machine) == group),
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn relabel_sets_then_removes_and_refuses_bad_labels() {
        let labels = [
            ("env".to_owned(), "prod".to_owned()),
            ("team".to_owned(), "a".to_owned()),
        ]
        .into();
        let set: HashMap<String, String> = [("role".to_owned(), "web".to_owned())].into();
        let relabelled = relabel(&labels, &set, &["team".to_owned()]).unwrap();
        assert_eq!(
            flotte_proto::labels::format_labels(&relabelled),
            "env=prod,role=web"
        );
        let bad: HashMap<String, String> = [("bad key".to_owned(), "x".to_owned())].into();
        assert!(matches!(
            relabel(&labels, &bad, &[]),
            Err(MachineError::InvalidLabels(_))
        ));
    }

    #[test]
    fn machines_are_found_by_id_prefix_or_hostname() {
        let a = crate::store::contract::machine(
            Uuid::parse_str("11111111-0000-4000-8000-000000000000").unwrap(),
            "web-1",
        );
        let mut b = a.clone();
        b.id = Uuid::parse_str("11112222-0000-4000-8000-000000000000").unwrap();
        b.inventory.hostname = "web-2".into();
        let machines = vec![a.clone(), b.clone()];
        assert_eq!(find_machine(&machines, "web-2").unwrap().id, b.id);
        assert_eq!(find_machine(&machines, "111111").unwrap().id, a.id);
        assert_eq!(find_machine(&machines, &a.id.to_string()).unwrap().id, a.id);
        assert!(matches!(
            find_machine(&machines, "1111"),
            Err(MachineError::Ambiguous { count: 2, .. })
        ));
        assert!(matches!(
            find_machine(&machines, "db-1"),
            Err(MachineError::NoMatch(_))
        ));
    }
}
