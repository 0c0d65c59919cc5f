//! `flotte.v1.Tokens` and `flotte.v1.Machines`: the admin API. Every call
//! requires an operator certificate.

use std::collections::HashMap;
use std::sync::Arc;

use flotte_proto::identity::is_valid_segment;
use flotte_proto::join_token::JoinToken;
use flotte_proto::labels::{validate_label, Selector};
use flotte_proto::v1::machines_server::Machines;
use flotte_proto::v1::tokens_server::Tokens;
use flotte_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, GetMachineRequest, ListMachinesRequest,
    ListMachinesResponse, ListTokensRequest, ListTokensResponse, Machine, RevokeTokenRequest,
    RevokeTokenResponse, SetLabelsRequest, TokenInfo,
};
use ring::rand::{SecureRandom, SystemRandom};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::api::session::push_desired_state;
use crate::auth::require_operator;
use crate::enrollment::hash_secret;
use crate::registry::ConnectedView;
use crate::store::{JoinTokenRecord, MachineRecord};
use crate::ServerState;

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

pub fn machine_to_proto(
    machine: &MachineRecord,
    connection: Option<&ConnectedView>,
    trust_domain: &str,
) -> Machine {
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

#[tonic::async_trait]
impl Tokens for AdminApi {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let caller = require_operator(&request)?;
        let request = request.into_inner();
        validate_token_request(&request)?;
        let now = self.state.clock.now_unix();
        let secret = random_hex(16)?;
        let record = JoinTokenRecord {
            id: random_hex(6)?,
            secret_hash: hash_secret(&secret),
            labels: request.labels.into_iter().collect(),
            zone: request.zone,
            created_at: now,
            expires_at: now.saturating_add(i64::try_from(request.ttl_seconds).unwrap_or(i64::MAX)),
            uses_allowed: request.uses.max(1),
            uses_done: 0,
            revoked: false,
        };
        self.state.store.insert_token(&record).await?;
        tracing::info!(token = %record.id, operator = %caller.identity, "join token created");
        let token = JoinToken {
            id: record.id.clone(),
            secret,
            ca_fingerprint: self.state.ca.fingerprint(),
        };
        Ok(Response::new(CreateTokenResponse {
            token: token.to_string(),
            info: Some(token_info(&record)),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        require_operator(&request)?;
        let tokens = self.state.store.list_tokens().await?;
        Ok(Response::new(ListTokensResponse {
            tokens: tokens.iter().map(token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = require_operator(&request)?;
        let id = request.into_inner().id;
        let record = self
            .state
            .store
            .revoke_token(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no join token with id {id}")))?;
        tracing::info!(token = %id, operator = %caller.identity, "join token revoked");
        Ok(Response::new(RevokeTokenResponse {
            info: Some(token_info(&record)),
        }))
    }
}

#[tonic::async_trait]
impl Machines for AdminApi {
    async fn list_machines(
        &self,
        request: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        require_operator(&request)?;
        let selector = Selector::parse(&request.into_inner().selector)
            .map_err(|error| Status::invalid_argument(format!("selector: {error}")))?;
        let machines = self.state.store.machines().await?;
        let connections: HashMap<Uuid, ConnectedView> = self.state.registry.views();
        let trust_domain = &self.state.config.trust_domain;
        let machines = machines
            .iter()
            .filter(|machine| {
                selector.matches(
                    |key| machine.labels.get(key).map(String::as_str),
                    &machine.zone,
                )
            })
            .map(|machine| machine_to_proto(machine, connections.get(&machine.id), trust_domain))
            .collect();
        Ok(Response::new(ListMachinesResponse { machines }))
    }

    async fn get_machine(
        &self,
        request: Request<GetMachineRequest>,
    ) -> Result<Response<Machine>, Status> {
        require_operator(&request)?;
        let key = request.into_inner().id;
        let machines = self.state.store.machines().await?;
        let machine = find_machine(&machines, &key)?;
        let view = self.state.registry.view(machine.id);
        Ok(Response::new(machine_to_proto(
            machine,
            view.as_ref(),
            &self.state.config.trust_domain,
        )))
    }

    async fn set_labels(
        &self,
        request: Request<SetLabelsRequest>,
    ) -> Result<Response<Machine>, Status> {
        let caller = require_operator(&request)?;
        let request = request.into_inner();
        let machines = self.state.store.machines().await?;
        let machine = find_machine(&machines, &request.id)?;
        let labels = relabel(&machine.labels, &request.set, &request.remove)?;
        let updated = self
            .state
            .store
            .update_labels(machine.id, &labels)
            .await?
            .ok_or_else(|| Status::not_found(format!("machine {} was removed", machine.id)))?;
        tracing::info!(machine = %updated.id, operator = %caller.identity, version = updated.desired_version, "labels changed");
        push_desired_state(&self.state, &updated).await;
        let view = self.state.registry.view(updated.id);
        Ok(Response::new(machine_to_proto(
            &updated,
            view.as_ref(),
            &self.state.config.trust_domain,
        )))
    }
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
