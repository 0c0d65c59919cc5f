//! `flotte.v1.Tokens` and `flotte.v1.Machines`: the admin API. Every call
//! passes the gate in `guard` (operator certificate, deny list, role) and
//! every mutating call is audited there.

use std::collections::HashMap;
use std::sync::Arc;

use flotte_proto::identity::is_valid_segment;
use flotte_proto::identity::Identity;
use flotte_proto::join_token::JoinToken;
use flotte_proto::labels::{validate_label, Selector};
use flotte_proto::v1::machines_server::Machines;
use flotte_proto::v1::server_message::Kind as ServerKind;
use flotte_proto::v1::tokens_server::Tokens;
use flotte_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, DecommissionMachineRequest, FleetStatusRequest,
    FleetStatusResponse, GetMachineRequest, GroupStatus, ListMachinesRequest, ListMachinesResponse,
    ListTokensRequest, ListTokensResponse, Machine, MachineEvent as ProtoMachineEvent,
    RevokeTokenRequest, RevokeTokenResponse, ServerMessage, SessionRefused, SetLabelsRequest,
    StateCount, StateTransition, TokenInfo, WatchMachinesRequest,
};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::api::guard::admit;
use crate::api::session::push_desired_state;
use crate::enrollment::hash_secret;
use crate::health::{MachineState, TrackedMachine};
use crate::registry::ConnectedView;
use crate::revocation::denial;
use crate::store::{DeniedKind, JoinTokenRecord, MachineRecord};
use crate::transitions::MachineEvent;
use crate::ServerState;
use flotte_common::roles::AdminRpc;

/// Transitions shown by `machines show`.
const TRANSITIONS_SHOWN: u32 = 50;
/// Events queued per watch stream before the watcher is considered slow.
const WATCH_QUEUE_DEPTH: usize = 64;
/// How long a revoked peer's connections stay open after the revocation, so
/// that the answer to the revoking call (and a refused session's reason)
/// reach their peers first. Every RPC is refused from the instant of the
/// revocation; this only delays closing the sockets.
pub const REVOCATION_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// Longest join token lifetime: a token is a secret in transit, not a credential to keep.
const MAX_TOKEN_TTL_SECONDS: u64 = 30 * 24 * 3600;

#[derive(Debug, Clone)]
pub struct AdminApi {
    state: Arc<ServerState>,
}

impl AdminApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        AdminApi { state }
    }
}

fn random_hex(bytes: usize) -> Result<String, Status> {
    let mut buffer = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buffer)
        .map_err(|_| Status::internal("the system random number generator failed"))?;
    Ok(hex::encode(buffer))
}

/// A new join token (not stored yet): its record, with only the secret's
/// hash, and the token text to hand out.
pub(crate) fn new_join_token(
    state: &ServerState,
    labels: std::collections::BTreeMap<String, String>,
    zone: String,
    ttl_seconds: u64,
    uses: u32,
) -> Result<(JoinTokenRecord, JoinToken), Status> {
    let now = state.clock.now_unix();
    let secret = random_hex(16)?;
    let record = JoinTokenRecord {
        id: random_hex(6)?,
        secret_hash: hash_secret(&secret),
        labels,
        zone,
        created_at: now,
        expires_at: now.saturating_add(i64::try_from(ttl_seconds).unwrap_or(i64::MAX)),
        uses_allowed: uses.max(1),
        uses_done: 0,
        revoked: false,
    };
    let token = JoinToken {
        id: record.id.clone(),
        secret,
        ca_fingerprint: state.ca.fingerprint(),
    };
    Ok((record, token))
}

fn token_info(record: &JoinTokenRecord) -> TokenInfo {
    TokenInfo {
        id: record.id.clone(),
        labels: record.labels.clone().into_iter().collect(),
        zone: record.zone.clone(),
        created_at: record.created_at,
        expires_at: record.expires_at,
        uses_allowed: record.uses_allowed,
        uses_done: record.uses_done,
        revoked: record.revoked,
    }
}

/// Checks a token request, listing every problem in one status.
fn validate_token_request(request: &CreateTokenRequest) -> Result<(), Status> {
    let mut problems = Vec::new();
    for (key, value) in &request.labels {
        if let Err(error) = validate_label(key, value) {
            problems.push(error.to_string());
        }
    }
    if !is_valid_segment(&request.zone) {
        problems.push(format!(
            "zone {:?} must be non-empty letters, digits, '.', '_' or '-'",
            request.zone
        ));
    }
    if request.ttl_seconds == 0 {
        problems.push("ttl must be positive".to_owned());
    } else if request.ttl_seconds > MAX_TOKEN_TTL_SECONDS {
        problems.push(format!(
            "ttl of {} s is longer than the maximum of 30 days",
            request.ttl_seconds
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Status::invalid_argument(problems.join("; ")))
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
            .and_then(|report| report.image.clone()),
        desired_image: machine
            .desired_image
            .as_ref()
            .map(|image| flotte_proto::v1::ImageRef {
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
                transition: crate::health::Transition {
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

/// Counts machines per state, in the canonical state order.
fn group_status<'a>(name: &str, machines: impl Iterator<Item = &'a TrackedMachine>) -> GroupStatus {
    let mut counts: HashMap<MachineState, u32> = HashMap::new();
    let mut total = 0u32;
    for machine in machines {
        *counts.entry(machine.state).or_default() += 1;
        total += 1;
    }
    GroupStatus {
        name: name.to_owned(),
        machines: total,
        states: MachineState::ALL
            .into_iter()
            .filter_map(|state| {
                counts.get(&state).map(|count| StateCount {
                    state: state.as_str().to_owned(),
                    machines: *count,
                })
            })
            .collect(),
    }
}

/// Fleet, per-zone and per-label-value state counts.
pub fn fleet_status(machines: &[TrackedMachine], by: &str) -> FleetStatusResponse {
    let mut zones: Vec<&str> = machines
        .iter()
        .map(|machine| machine.zone.as_str())
        .collect();
    zones.sort_unstable();
    zones.dedup();
    let mut groups: Vec<&str> = Vec::new();
    if !by.is_empty() {
        groups = machines
            .iter()
            .map(|machine| machine.labels.get(by).map_or("(none)", String::as_str))
            .collect();
        groups.sort_unstable();
        groups.dedup();
    }
    FleetStatusResponse {
        fleet: Some(group_status("fleet", machines.iter())),
        zones: zones
            .into_iter()
            .map(|zone| group_status(zone, machines.iter().filter(|machine| machine.zone == zone)))
            .collect(),
        groups: groups
            .into_iter()
            .map(|group| {
                group_status(
                    group,
                    machines.iter().filter(|machine| {
                        machine.labels.get(by).map_or("(none)", String::as_str) == group
                    }),
                )
            })
            .collect(),
        by: by.to_owned(),
    }
}

/// Finds a machine by full id, unique id prefix, or unique hostname.
pub fn find_machine<'a>(
    machines: &'a [MachineRecord],
    key: &str,
) -> Result<&'a MachineRecord, Status> {
    if let Ok(id) = Uuid::parse_str(key) {
        return machines
            .iter()
            .find(|machine| machine.id == id)
            .ok_or_else(|| Status::not_found(format!("no machine with id {key}")));
    }
    let matches: Vec<_> = machines
        .iter()
        .filter(|machine| {
            machine.id.to_string().starts_with(key) || machine.inventory.hostname == key
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(Status::not_found(format!(
            "no machine matches {key:?} (id, id prefix or hostname)"
        ))),
        many => Err(Status::invalid_argument(format!(
            "{key:?} matches {} machines; use more of the id",
            many.len()
        ))),
    }
}

/// [`find_machine`], refusing a decommissioned machine: what every call that
/// changes a machine needs (a retired machine never comes back).
pub fn find_machine_in_service<'a>(
    machines: &'a [MachineRecord],
    key: &str,
) -> Result<&'a MachineRecord, Status> {
    let machine = find_machine(machines, key)?;
    if machine.retired_at.is_some() {
        return Err(Status::failed_precondition(format!(
            "machine {} was decommissioned",
            machine.id
        )));
    }
    Ok(machine)
}

#[tonic::async_trait]
impl Tokens for AdminApi {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let arguments = {
            let request = request.get_ref();
            json!({
                "labels": request.labels,
                "zone": request.zone,
                "ttl_seconds": request.ttl_seconds,
                "uses": request.uses,
            })
        };
        let call = admit(&self.state, &request, AdminRpc::CreateToken, arguments).await?;
        let state = Arc::clone(&self.state);
        let operator = call.caller.identity.clone();
        let request = request.into_inner();
        call.run(
            async move {
                validate_token_request(&request)?;
                let (record, token) = new_join_token(
                    &state,
                    request.labels.into_iter().collect(),
                    request.zone,
                    request.ttl_seconds,
                    request.uses,
                )?;
                state.store.insert_token(&record).await?;
                tracing::info!(token = %record.id, %operator, "join token created");
                Ok(CreateTokenResponse {
                    token: token.to_string(),
                    info: Some(token_info(&record)),
                })
            },
            // The token's id, never its secret.
            |response| {
                format!(
                    "token {}",
                    response.info.as_ref().map_or("", |info| info.id.as_str())
                )
            },
        )
        .await
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ListTokens, json!({})).await?;
        let tokens = self.state.store.list_tokens().await?;
        Ok(Response::new(ListTokensResponse {
            tokens: tokens.iter().map(token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let id = request.get_ref().id.clone();
        let call = admit(
            &self.state,
            &request,
            AdminRpc::RevokeToken,
            json!({ "id": id }),
        )
        .await?;
        let state = Arc::clone(&self.state);
        let operator = call.caller.identity.clone();
        call.run(
            async move {
                let record = state
                    .store
                    .revoke_token(&id)
                    .await?
                    .ok_or_else(|| Status::not_found(format!("no join token with id {id}")))?;
                tracing::info!(token = %id, %operator, "join token revoked");
                Ok(RevokeTokenResponse {
                    info: Some(token_info(&record)),
                })
            },
            |_| String::new(),
        )
        .await
    }
}

#[tonic::async_trait]
impl Machines for AdminApi {
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
                proto.quarantine = quarantines
                    .get(&machine.id)
                    .map(crate::api::repair::quarantine_to_proto);
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
        let machines = self.state.store.machines().await?;
        let machine = find_machine(&machines, &key)?;
        let view = self.state.registry.view(machine.id);
        let tracked = self.state.health.get(machine.id);
        let mut proto = machine_to_proto(
            machine,
            view.as_ref(),
            tracked.as_ref(),
            &self.state.config.trust_domain,
        );
        if let Some(report) = tracked.and_then(|tracked| tracked.last_report) {
            proto.checks = report.checks.clone();
            proto.metrics = report.metrics.clone();
            proto.metric_breaches = report.metric_breaches.clone();
        }
        proto.quarantine = self
            .state
            .repair
            .store
            .quarantine(machine.id)
            .await?
            .as_ref()
            .map(crate::api::repair::quarantine_to_proto);
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
                let wanted: flotte_proto::image::ImageReference =
                    request.reference.parse().map_err(|error: flotte_proto::image::ImageError| {
                        Status::invalid_argument(error.to_string())
                    })?;
                let image = state
                    .store
                    .image(&wanted.name, &wanted.version.to_string())
                    .await?
                    .ok_or_else(|| Status::not_found(format!("no image {wanted}: push it first")))?;
                let machines = state.store.machines().await?;
                let machine = find_machine_in_service(&machines, &request.id)?;
                let desired = crate::store::DesiredImageRecord {
                    name: image.name.clone(),
                    version: image.version.clone(),
                    digest: image.digest.clone(),
                    rollback: request.rollback,
                };
                let updated = state
                    .store
                    .set_desired_image(machine.id, Some(&desired))
                    .await?
                    .ok_or_else(|| Status::not_found(format!("machine {} was removed", machine.id)))?;
                tracing::info!(machine = %updated.id, image = %wanted, version = updated.desired_version, "desired image set");
                push_desired_state(&state, &updated).await;
                let view = state.registry.view(updated.id);
                let tracked = state.health.get(updated.id);
                Ok(machine_to_proto(
                    &updated,
                    view.as_ref(),
                    tracked.as_ref(),
                    &state.config.trust_domain,
                ))
            },
            |machine: &Machine| format!("{} desired version {}", machine.id, machine.desired_version),
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
        Ok(Response::new(fleet_status(&machines, &request.by)))
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
        let request = request.into_inner();
        call.run(
            async move {
                let machines = state.store.machines().await?;
                let machine = find_machine_in_service(&machines, &request.id)?;
                let labels = relabel(&machine.labels, &request.set, &request.remove)?;
                let updated = state
                    .store
                    .update_labels(machine.id, &labels)
                    .await?
                    .ok_or_else(|| {
                        Status::not_found(format!("machine {} was removed", machine.id))
                    })?;
                tracing::info!(machine = %updated.id, %operator, version = updated.desired_version, "labels changed");
                state.health.upsert(&updated, state.clock.now_unix());
                push_desired_state(&state, &updated).await;
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
            async move { decommission(&state, &key, &operator).await },
            |machine| format!("machine {} retired", machine.id),
        )
        .await
    }
}

/// Retires a machine: marked retired and its identity and serials denied in
/// one store operation, then refused in memory, told why on its session, and
/// its connections closed.
async fn decommission(state: &ServerState, key: &str, operator: &str) -> Result<Machine, Status> {
    let machines = state.store.machines().await?;
    let machine = find_machine(&machines, key)?;
    if let Some(retired_at) = machine.retired_at {
        return Err(Status::failed_precondition(format!(
            "machine {} was already decommissioned at {retired_at} (unix)",
            machine.id
        )));
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
        .ok_or_else(|| Status::not_found(format!("machine {} was removed", machine.id)))?;
    // Refused from now on (a reconnect fails at the handshake); the agent is
    // told why on its session before the connection goes, and logs it.
    state
        .revocations
        .enforce(&denied, &identity_uri, REVOCATION_GRACE);
    if let Some(sender) = state.registry.sender(machine.id) {
        let _ = sender.try_send(Ok(ServerMessage {
            kind: Some(ServerKind::Refused(SessionRefused {
                reason: reason.clone(),
            })),
        }));
    }
    state.registry.end_session(machine.id);
    state.health.retire(machine.id, &reason, now);
    tracing::warn!(machine = %machine.id, %operator, "machine decommissioned");
    let tracked = state.health.get(machine.id);
    Ok(machine_to_proto(
        &retired,
        None,
        tracked.as_ref(),
        &state.config.trust_domain,
    ))
}

/// Applies `set` then `remove` to `labels`, listing every invalid label.
fn relabel(
    labels: &std::collections::BTreeMap<String, String>,
    set: &HashMap<String, String>,
    remove: &[String],
) -> Result<std::collections::BTreeMap<String, String>, Status> {
    let problems: Vec<String> = set
        .iter()
        .filter_map(|(key, value)| validate_label(key, value).err())
        .map(|error| error.to_string())
        .collect();
    if !problems.is_empty() {
        return Err(Status::invalid_argument(problems.join("; ")));
    }
    let mut labels = labels.clone();
    labels.extend(set.iter().map(|(key, value)| (key.clone(), value.clone())));
    for key in remove {
        labels.remove(key);
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_requests_list_every_problem() {
        let request = CreateTokenRequest {
            labels: [("bad key".to_owned(), "v".to_owned())].into(),
            zone: String::new(),
            ttl_seconds: 0,
            uses: 1,
        };
        let status = validate_token_request(&request).unwrap_err();
        let message = status.message();
        assert!(message.contains("bad key"), "{message}");
        assert!(message.contains("zone"), "{message}");
        assert!(message.contains("ttl must be positive"), "{message}");
    }

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
        assert_eq!(
            relabel(&labels, &bad, &[]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn machines_are_found_by_id_prefix_or_hostname() {
        let mut a = MachineRecord {
            id: Uuid::parse_str("11111111-0000-4000-8000-000000000000").unwrap(),
            labels: Default::default(),
            zone: "dc1".into(),
            enrolled_at: 0,
            enrolled_with_token: String::new(),
            certificate_serial: String::new(),
            previous_certificate_serial: String::new(),
            certificate_not_after: 0,
            inventory: Default::default(),
            last_seen: 0,
            desired_version: 1,
            state: "unknown".into(),
            state_reason: String::new(),
            state_since: 0,
            retired_at: None,
            desired_image: None,
        };
        a.inventory.hostname = "web-1".into();
        let mut b = a.clone();
        b.id = Uuid::parse_str("11112222-0000-4000-8000-000000000000").unwrap();
        b.inventory.hostname = "web-2".into();
        let machines = vec![a.clone(), b.clone()];
        assert_eq!(find_machine(&machines, "web-2").unwrap().id, b.id);
        assert_eq!(find_machine(&machines, "111111").unwrap().id, a.id);
        assert_eq!(find_machine(&machines, &a.id.to_string()).unwrap().id, a.id);
        assert_eq!(
            find_machine(&machines, "1111").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            find_machine(&machines, "db-1").unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
}
