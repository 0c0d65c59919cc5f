//! `flotte.v1.Machines`: listing, showing and watching machines, and the
//! changes operators make to them. Every call passes the gate in `guard`;
//! the rules live in `services::machines`.

use std::collections::HashMap;
use std::sync::Arc;

use flotte_proto::labels::{validate_label, Selector};
use flotte_proto::v1::machines_server::Machines;
use flotte_proto::v1::{
    DecommissionMachineRequest, FleetStatusRequest, FleetStatusResponse, GetMachineRequest,
    GroupStatus, ImageRef, ListMachinesRequest, ListMachinesResponse, Machine,
    MachineEvent as ProtoMachineEvent, Replica, Report, SetLabelsRequest, StateCount,
    StateTransition, WatchMachinesRequest,
};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::edge::guard::admit;
use crate::live::health::TrackedMachine;
use crate::live::registry::ConnectedView;
use crate::live::transitions::MachineEvent;
use crate::services::machines::{self, FleetCounts, GroupCounts, MachineError};
use crate::store::replicas::ReplicaStatus;
use crate::store::MachineRecord;
use crate::ServerState;
use flotte_common::roles::AdminRpc;

/// Transitions shown by `machines show`.
const TRANSITIONS_SHOWN: u32 = 50;
/// Events queued per watch stream before the watcher is considered slow.
const WATCH_QUEUE_DEPTH: usize = 64;

#[derive(Debug, Clone)]
pub struct MachinesApi {
    state: Arc<ServerState>,
}

impl MachinesApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        MachinesApi { state }
    }
}

impl From<MachineError> for Status {
    fn from(error: MachineError) -> Self {
        match error {
            MachineError::NoSuchId(_) | MachineError::NoMatch(_) | MachineError::Removed(_) => {
                Status::not_found(error.to_string())
            }
            MachineError::NoSuchImage(_) => Status::not_found(error.to_string()),
            MachineError::Ambiguous { .. }
            | MachineError::InvalidLabels(_)
            | MachineError::InvalidImage(_) => Status::invalid_argument(error.to_string()),
            MachineError::RelabelChangesAccess { .. } => {
                Status::permission_denied(error.to_string())
            }
            MachineError::Retired(_) | MachineError::AlreadyRetired { .. } => {
                Status::failed_precondition(error.to_string())
            }
            MachineError::Store(error) => error.into(),
        }
    }
}

/// Names the replica holding the machine's session: a machine connected to
/// another replica is connected too.
fn with_replica(machine: &mut Machine, holder: Option<&String>) {
    if let Some(holder) = holder {
        machine.replica = holder.clone();
        machine.connected = true;
    }
}

/// A machine as listed: store facts, live connection, tracked health state.
pub fn machine_to_proto(
    machine: &MachineRecord,
    connection: Option<&ConnectedView>,
    tracked: Option<&TrackedMachine>,
    trust_domain: &str,
) -> Machine {
    let (state, state_reason, state_since) = match tracked {
        Some(tracked) => (
            tracked.state.as_str().to_owned(),
            tracked.reason.clone(),
            tracked.since,
        ),
        None => (
            machine.state.clone(),
            machine.state_reason.clone(),
            machine.state_since,
        ),
    };
    Machine {
        id: machine.id.to_string(),
        hostname: machine.inventory.hostname.clone(),
        zone: machine.zone.clone(),
        labels: machine.labels.clone().into_iter().collect(),
        connected: connection.is_some(),
        last_seen: connection.map_or(machine.last_seen, |view| {
            view.last_seen.max(machine.last_seen)
        }),
        agent_version: machine.inventory.agent_version.clone(),
        certificate_not_after: machine.certificate_not_after,
        os: machine.inventory.os.clone(),
        kernel: machine.inventory.kernel.clone(),
        boot_time: machine.inventory.boot_time,
        enrolled_at: machine.enrolled_at,
        identity_uri: flotte_proto::identity::Identity::machine(trust_domain, machine.id).uri(),
        arch: machine.inventory.arch.clone(),
        remote_address: connection
            .map(|view| view.remote_address.to_string())
            .unwrap_or_default(),
        desired_version: machine.desired_version,
        applied_desired_version: connection.map_or(0, |view| view.applied_desired_version),
        state,
        state_reason,
        state_since,
        retired_at: machine.retired_at.unwrap_or(0),
        image: tracked
            .and_then(|tracked| tracked.last_report.as_ref())
            .and_then(|report| report.image.as_ref())
            .map(crate::edge::health_report::image_status_to_proto),
        desired_image: machine.desired_image.as_ref().map(|image| ImageRef {
            name: image.name.clone(),
            version: image.version.clone(),
            digest: image.digest.clone(),
        }),
        ..Machine::default()
    }
}

fn transition_to_proto(at: i64, from: &str, to: &str, reason: &str) -> StateTransition {
    StateTransition {
        at,
        from: from.to_owned(),
        to: to.to_owned(),
        reason: reason.to_owned(),
    }
}

fn event_to_proto(event: &MachineEvent, snapshot: bool) -> ProtoMachineEvent {
    ProtoMachineEvent {
        machine_id: event.machine_id.to_string(),
        hostname: event.hostname.clone(),
        zone: event.zone.clone(),
        labels: event.labels.clone().into_iter().collect(),
        transition: Some(transition_to_proto(
            event.transition.at,
            event.transition.from.as_str(),
            event.transition.to.as_str(),
            &event.transition.reason,
        )),
        snapshot,
    }
}

fn selector_matches(
    selector: &Selector,
    labels: &std::collections::BTreeMap<String, String>,
    zone: &str,
) -> bool {
    selector.matches(|key| labels.get(key).map(String::as_str), zone)
}

/// The current state of every matching machine, as watch events.
fn snapshot_events(state: &ServerState, selector: &Selector) -> Vec<ProtoMachineEvent> {
    let mut machines: Vec<(Uuid, TrackedMachine)> = state
        .health
        .snapshot()
        .into_iter()
        .filter(|(_, machine)| selector_matches(selector, &machine.labels, &machine.zone))
        .collect();
    machines.sort_by(|a, b| (&a.1.zone, &a.1.hostname).cmp(&(&b.1.zone, &b.1.hostname)));
    machines
        .into_iter()
        .map(|(machine_id, machine)| {
            let event = MachineEvent {
                machine_id,
                hostname: machine.hostname,
                zone: machine.zone,
                labels: machine.labels,
                transition: crate::live::health::Transition {
                    machine_id,
                    at: machine.since,
                    from: machine.state,
                    to: machine.state,
                    reason: machine.reason,
                },
            };
            let mut proto = event_to_proto(&event, true);
            if let Some(transition) = proto.transition.as_mut() {
                transition.from.clear();
            }
            proto
        })
        .collect()
}

fn group_to_proto(group: &GroupCounts) -> GroupStatus {
    GroupStatus {
        name: group.name.clone(),
        machines: group.machines,
        states: group
            .states
            .iter()
            .map(|(state, count)| StateCount {
                state: state.as_str().to_owned(),
                machines: *count,
            })
            .collect(),
    }
}

/// The wire form of the fleet's counts.
fn replica_to_proto(replica: ReplicaStatus) -> Replica {
    Replica {
        name: replica.registration.name,
        zone: replica.registration.zone,
        address: replica.registration.address,
        leader: replica.leader,
        sessions: replica.sessions,
        lease_age_ms: replica.lease_age_ms,
        live: replica.live,
    }
}

pub fn fleet_status_to_proto(counts: &FleetCounts, by: &str) -> FleetStatusResponse {
    FleetStatusResponse {
        fleet: Some(group_to_proto(&counts.fleet)),
        zones: counts.zones.iter().map(group_to_proto).collect(),
        groups: counts.groups.iter().map(group_to_proto).collect(),
        by: by.to_owned(),
        ..FleetStatusResponse::default()
    }
}

#[tonic::async_trait]
impl Machines for MachinesApi {
    async fn list_machines(
        &self,
        request: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ListMachines, json!({})).await?;
        let selector = Selector::parse(&request.into_inner().selector)
            .map_err(|error| Status::invalid_argument(format!("selector: {error}")))?;
        let machines = self.state.store.machines().await?;
        let quarantines: HashMap<Uuid, _> = self
            .state
            .repair
            .store
            .quarantines()
            .await?
            .into_iter()
            .map(|quarantine| (quarantine.machine_id, quarantine))
            .collect();
        let connections: HashMap<Uuid, ConnectedView> = self.state.registry.views();
        let holders = self.state.replica_store.live_session_holders().await?;
        let tracked = self.state.health.snapshot();
        let trust_domain = &self.state.config.trust_domain;
        let machines = machines
            .iter()
            .filter(|machine| selector_matches(&selector, &machine.labels, &machine.zone))
            .map(|machine| {
                let mut proto = machine_to_proto(
                    machine,
                    connections.get(&machine.id),
                    tracked.get(&machine.id),
                    trust_domain,
                );
                with_replica(&mut proto, holders.get(&machine.id));
                proto.quarantine = quarantines
                    .get(&machine.id)
                    .map(crate::edge::repair::quarantine_to_proto);
                proto.current_image_created_at = tracked
                    .get(&machine.id)
                    .and_then(|tracked| self.state.image_ages.of_machine(tracked))
                    .unwrap_or(0);
                proto
            })
            .collect();
        Ok(Response::new(ListMachinesResponse { machines }))
    }

    async fn get_machine(
        &self,
        request: Request<GetMachineRequest>,
    ) -> Result<Response<Machine>, Status> {
        admit(&self.state, &request, AdminRpc::GetMachine, json!({})).await?;
        let key = request.into_inner().id;
        let machine = &machines::resolve(&self.state, &key).await?;
        let view = self.state.registry.view(machine.id);
        let tracked = self.state.health.get(machine.id);
        let mut proto = machine_to_proto(
            machine,
            view.as_ref(),
            tracked.as_ref(),
            &self.state.config.trust_domain,
        );
        let holders = self.state.replica_store.live_session_holders().await?;
        with_replica(&mut proto, holders.get(&machine.id));
        proto.current_image_created_at = tracked
            .as_ref()
            .and_then(|tracked| self.state.image_ages.of_machine(tracked))
            .unwrap_or(0);
        if let Some(report) = tracked.and_then(|tracked| tracked.last_report) {
            let Report {
                checks,
                metrics,
                metric_breaches,
                ..
            } = crate::edge::health_report::health_report_to_proto(&report);
            proto.checks = checks;
            proto.metrics = metrics;
            proto.metric_breaches = metric_breaches;
        }
        proto.quarantine = self
            .state
            .repair
            .store
            .quarantine(machine.id)
            .await?
            .as_ref()
            .map(crate::edge::repair::quarantine_to_proto);
        proto.transitions = self
            .state
            .store
            .transitions(machine.id, TRANSITIONS_SHOWN)
            .await?
            .iter()
            .map(|record| transition_to_proto(record.at, &record.from, &record.to, &record.reason))
            .collect();
        Ok(Response::new(proto))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<ProtoMachineEvent, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchMachinesRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        admit(&self.state, &request, AdminRpc::WatchMachines, json!({})).await?;
        let selector = Selector::parse(&request.into_inner().selector)
            .map_err(|error| Status::invalid_argument(format!("selector: {error}")))?;
        // Subscribe before taking the snapshot so that no change falls between.
        let mut events = self.state.events.subscribe();
        let state = Arc::clone(&self.state);
        let (sender, receiver) = tokio::sync::mpsc::channel(WATCH_QUEUE_DEPTH);
        tokio::spawn(async move {
            let mut pending = snapshot_events(&state, &selector);
            loop {
                for event in pending.drain(..) {
                    if sender.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                let received = tokio::select! {
                    () = sender.closed() => return,
                    received = events.recv() => received,
                };
                match received {
                    Ok(event) if selector_matches(&selector, &event.labels, &event.zone) => {
                        pending.push(event_to_proto(&event, false));
                    }
                    Ok(_) => {}
                    // Fell behind: start again from the current state.
                    Err(RecvError::Lagged(_)) => pending = snapshot_events(&state, &selector),
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn set_image(
        &self,
        request: Request<flotte_proto::v1::SetImageRequest>,
    ) -> Result<Response<Machine>, Status> {
        let arguments = {
            let request = request.get_ref();
            json!({ "machine": request.id, "image": request.reference, "rollback": request.rollback })
        };
        let call = admit(&self.state, &request, AdminRpc::SetImage, arguments).await?;
        let state = Arc::clone(&self.state);
        let request = request.into_inner();
        call.run(
            async move {
                let updated =
                    machines::set_image(&state, &request.id, &request.reference, request.rollback)
                        .await?;
                let view = state.registry.view(updated.id);
                let tracked = state.health.get(updated.id);
                Ok(machine_to_proto(
                    &updated,
                    view.as_ref(),
                    tracked.as_ref(),
                    &state.config.trust_domain,
                ))
            },
            |machine: &Machine| {
                format!("{} desired version {}", machine.id, machine.desired_version)
            },
        )
        .await
    }

    async fn fleet_status(
        &self,
        request: Request<FleetStatusRequest>,
    ) -> Result<Response<FleetStatusResponse>, Status> {
        admit(&self.state, &request, AdminRpc::FleetStatus, json!({})).await?;
        let request = request.into_inner();
        let selector = Selector::parse(&request.selector)
            .map_err(|error| Status::invalid_argument(format!("selector: {error}")))?;
        if !request.by.is_empty() {
            validate_label(&request.by, "")
                .map_err(|error| Status::invalid_argument(format!("by: {error}")))?;
        }
        let machines: Vec<TrackedMachine> = self
            .state
            .health
            .snapshot()
            .into_values()
            .filter(|machine| selector_matches(&selector, &machine.labels, &machine.zone))
            .collect();
        let mut status =
            fleet_status_to_proto(&machines::fleet_counts(&machines, &request.by), &request.by);
        status.replicas = self
            .state
            .replica_store
            .replicas()
            .await?
            .into_iter()
            .map(replica_to_proto)
            .collect();
        let on_old_images = crate::domain::image_age::machines_on_old_images(
            machines
                .iter()
                .filter(|machine| machine.state != crate::domain::health::MachineState::Retired)
                .map(|machine| self.state.image_ages.of_machine(machine)),
            self.state.clock.now_unix(),
            self.state.config.image_max_age,
        );
        status.machines_on_old_images = u32::try_from(on_old_images).unwrap_or(u32::MAX);
        status.image_max_age_seconds = self.state.config.image_max_age.as_secs();
        Ok(Response::new(status))
    }

    async fn set_labels(
        &self,
        request: Request<SetLabelsRequest>,
    ) -> Result<Response<Machine>, Status> {
        let arguments = {
            let request = request.get_ref();
            json!({ "machine": request.id, "set": request.set, "remove": request.remove })
        };
        let call = admit(&self.state, &request, AdminRpc::SetLabels, arguments).await?;
        let state = Arc::clone(&self.state);
        let operator = call.caller.identity.clone();
        let role = call.role;
        let request = request.into_inner();
        call.run(
            async move {
                let updated = machines::set_labels(
                    &state,
                    &request.id,
                    &request.set,
                    &request.remove,
                    role,
                )
                .await?;
                tracing::info!(machine = %updated.id, %operator, version = updated.desired_version, "labels changed");
                let view = state.registry.view(updated.id);
                let tracked = state.health.get(updated.id);
                Ok(machine_to_proto(
                    &updated,
                    view.as_ref(),
                    tracked.as_ref(),
                    &state.config.trust_domain,
                ))
            },
            |machine| format!("machine {} desired version {}", machine.id, machine.desired_version),
        )
        .await
    }

    async fn decommission_machine(
        &self,
        request: Request<DecommissionMachineRequest>,
    ) -> Result<Response<Machine>, Status> {
        let key = request.get_ref().id.clone();
        let call = admit(
            &self.state,
            &request,
            AdminRpc::DecommissionMachine,
            json!({ "machine": key }),
        )
        .await?;
        let state = Arc::clone(&self.state);
        let operator = call.actor().to_owned();
        call.run(
            async move {
                let retired = machines::decommission(&state, &key, &operator).await?;
                let tracked = state.health.get(retired.id);
                Ok(machine_to_proto(
                    &retired,
                    None,
                    tracked.as_ref(),
                    &state.config.trust_domain,
                ))
            },
            |machine| format!("machine {} retired", machine.id),
        )
        .await
    }
}
