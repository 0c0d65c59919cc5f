//! `flotte.v1.Users` and `flotte.v1.Access`: people, their SSH keys, grants
//! by selector, propagation status and the who-has-access report; plus the
//! session side of access: the policy a machine gets on connect, the
//! fan-out of a change to every connected agent, and agents' access acks.
//!
//! Every change commits to the store (bumping the global policy version),
//! refreshes the hub, then pushes the new policy on every live session with
//! `try_send` — one pass over the fleet per change, never per message.

use std::collections::HashMap;
use std::sync::Arc;

use flotte_proto::labels::Selector;
use flotte_proto::ssh_keys::{fingerprint_of_key_text, parse_public_key, SshPublicKey};
use flotte_proto::v1::access_server::Access;
use flotte_proto::v1::users_server::Users;
use flotte_proto::v1::{
    AccessPolicy, AccessReportEntry, AccessReportRequest, AccessReportResponse, AccessState,
    AccessStatusRequest, AccessStatusResponse, AddUserKeyRequest, AddUserRequest, AuthorizedKey,
    GetUserRequest, GrantInfo, GrantRequest, ListGrantsRequest, ListGrantsResponse,
    ListUsersRequest, ListUsersResponse, LoginKeys, MachineAccessStatus, RemoveUserKeyRequest,
    RevokeGrantRequest, RevokeUserRequest, RevokeUserResponse, SshKeyInfo, UserInfo,
};
use serde_json::json;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::access::{
    access_report, compile_policy, delivery_status, parse_expiry, validate_login,
    validate_user_name, AccessError, DeliveryStatus, MachinePolicy,
};
use crate::edge::guard::admit;
use crate::services::access::{self, AccessServiceError};
use crate::services::machines::find_machine;
use crate::store::{
    FoundKeysRecord, GrantRecord, MachineAccessRecord, MachineRecord, UserKeyRecord, UserRecord,
};
use crate::ServerState;
use flotte_common::roles::AdminRpc;

/// Bounds on what one agent may report (its message is bounded too).
const MAX_REPORTED_LOGINS: usize = 1024;
const MAX_REPORTED_KEYS_PER_FILE: usize = 1024;

impl From<AccessServiceError> for Status {
    fn from(error: AccessServiceError) -> Self {
        match error {
            AccessServiceError::NoSuchUser(_) => Status::not_found(error.to_string()),
            AccessServiceError::Store(error) => error.into(),
        }
    }
}

impl From<AccessError> for Status {
    fn from(error: AccessError) -> Self {
        Status::invalid_argument(error.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct AccessApi {
    state: Arc<ServerState>,
}

impl AccessApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        AccessApi { state }
    }
}

/// The wire form of a machine's policy.
pub fn policy_to_proto(policy: &MachinePolicy) -> AccessPolicy {
    AccessPolicy {
        version: policy.version,
        logins: policy
            .logins
            .iter()
            .map(|(login, keys)| LoginKeys {
                login: login.clone(),
                keys: keys
                    .iter()
                    .map(|key| AuthorizedKey {
                        public_key: key.public_key.clone(),
                        user: key.user.clone(),
                        grant_id: key.grant_id.clone(),
                        expires_at: key.expires_at.unwrap_or(0),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// An agent's access acknowledgement and findings, kept in memory (flushed
/// to the store in batches).
pub fn record_access_state(state: &ServerState, machine_id: Uuid, access: AccessState, now: i64) {
    let mut missing_logins = access.missing_logins;
    missing_logins.truncate(MAX_REPORTED_LOGINS);
    missing_logins.sort();
    let mut found: Vec<FoundKeysRecord> = access
        .found
        .into_iter()
        .take(MAX_REPORTED_LOGINS)
        .map(|file| FoundKeysRecord {
            login: file.login,
            source: file.source,
            public_keys: file
                .public_keys
                .into_iter()
                .take(MAX_REPORTED_KEYS_PER_FILE)
                .collect(),
        })
        .collect();
    found.sort_by(|a, b| (&a.login, &a.source).cmp(&(&b.login, &b.source)));
    state.access.record(MachineAccessRecord {
        machine_id,
        applied_version: access.applied_version,
        applied_at: now,
        missing_logins,
        found,
    });
}

fn parse_key(text: &str) -> Result<SshPublicKey, Status> {
    parse_public_key(text)
        .map_err(|error| Status::invalid_argument(format!("SSH public key refused: {error}")))
}

fn key_record(user: &str, key: &SshPublicKey, now: i64) -> UserKeyRecord {
    UserKeyRecord {
        user: user.to_owned(),
        fingerprint: key.fingerprint(),
        key_type: key.key_type.clone(),
        public_key: key.key_text(),
        comment: key.comment.clone(),
        added_at: now,
    }
}

fn key_info(key: &UserKeyRecord) -> SshKeyInfo {
    SshKeyInfo {
        key_type: key.key_type.clone(),
        fingerprint: key.fingerprint.clone(),
        comment: key.comment.clone(),
        openssh: if key.comment.is_empty() {
            key.public_key.clone()
        } else {
            format!("{} {}", key.public_key, key.comment)
        },
        added_at: key.added_at,
    }
}

fn machines_matching(selector: &str, machines: &[MachineRecord]) -> u32 {
    let Ok(selector) = Selector::parse(selector) else {
        return 0;
    };
    let count = machines
        .iter()
        .filter(|machine| machine.retired_at.is_none())
        .filter(|machine| {
            selector.matches(
                |key| machine.labels.get(key).map(String::as_str),
                &machine.zone,
            )
        })
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

fn grant_info(grant: &GrantRecord, machines: &[MachineRecord]) -> GrantInfo {
    GrantInfo {
        id: grant.id.clone(),
        user: grant.user.clone(),
        selector: grant.selector.clone(),
        login: grant.login.clone(),
        expires_at: grant.expires_at.unwrap_or(0),
        created_at: grant.created_at,
        created_by: grant.created_by.clone(),
        machines: machines_matching(&grant.selector, machines),
    }
}

/// Every user (or only `only`) with keys and grants, from one snapshot.
async fn user_infos(state: &ServerState, only: Option<&str>) -> Result<Vec<UserInfo>, Status> {
    let snapshot = state.access.store().access_snapshot().await?;
    let machines = state.store.machines().await?;
    Ok(snapshot
        .users
        .iter()
        .filter(|user| only.is_none_or(|name| user.name == name))
        .map(|user| UserInfo {
            name: user.name.clone(),
            keys: snapshot
                .keys
                .iter()
                .filter(|key| key.user == user.name)
                .map(key_info)
                .collect(),
            created_at: user.created_at,
            created_by: user.created_by.clone(),
            revoked_at: user.revoked_at.unwrap_or(0),
            grants: snapshot
                .grants
                .iter()
                .filter(|grant| grant.user == user.name)
                .map(|grant| grant_info(grant, &machines))
                .collect(),
        })
        .collect())
}

async fn one_user(state: &ServerState, name: &str) -> Result<UserInfo, Status> {
    user_infos(state, Some(name))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Status::not_found(format!("no user named {name}")))
}

/// The user `name`, refusing unknown and off-boarded ones.
async fn active_user(state: &ServerState, name: &str) -> Result<UserRecord, Status> {
    let snapshot = state.access.store().access_snapshot().await?;
    let user = snapshot
        .users
        .into_iter()
        .find(|user| user.name == name)
        .ok_or_else(|| Status::not_found(format!("no user named {name}")))?;
    if let Some(revoked_at) = user.revoked_at {
        return Err(Status::failed_precondition(format!(
            "user {name} was revoked at {revoked_at} (unix); names are not reused"
        )));
    }
    Ok(user)
}

async fn add_user(
    state: &ServerState,
    request: AddUserRequest,
    created_by: &str,
) -> Result<UserInfo, Status> {
    validate_user_name(&request.name)?;
    let now = state.clock.now_unix();
    let mut keys: Vec<UserKeyRecord> = Vec::new();
    let mut problems = Vec::new();
    for (index, text) in request.ssh_keys.iter().enumerate() {
        match parse_public_key(text) {
            Ok(key)
                if keys
                    .iter()
                    .any(|known| known.fingerprint == key.fingerprint()) =>
            {
                problems.push(format!("key {}: the same key is given twice", index + 1));
            }
            Ok(key) => keys.push(key_record(&request.name, &key, now)),
            Err(error) => problems.push(format!("key {}: {error}", index + 1)),
        }
    }
    if !problems.is_empty() {
        return Err(Status::invalid_argument(format!(
            "SSH public keys refused: {}",
            problems.join("; ")
        )));
    }
    let user = UserRecord {
        name: request.name.clone(),
        created_at: now,
        created_by: created_by.to_owned(),
        revoked_at: None,
    };
    state.access.store().insert_user(&user, &keys).await?;
    state.publisher.access_changed().await?;
    one_user(state, &request.name).await
}

async fn add_user_key(state: &ServerState, request: AddUserKeyRequest) -> Result<UserInfo, Status> {
    active_user(state, &request.name).await?;
    let key = parse_key(&request.ssh_key)?;
    state
        .access
        .store()
        .insert_user_key(&key_record(&request.name, &key, state.clock.now_unix()))
        .await?;
    state.publisher.access_changed().await?;
    one_user(state, &request.name).await
}

async fn remove_user_key(
    state: &ServerState,
    request: RemoveUserKeyRequest,
) -> Result<UserInfo, Status> {
    let fingerprint = if request.key.trim().starts_with("SHA256:") {
        request.key.trim().to_owned()
    } else {
        parse_key(&request.key)?.fingerprint()
    };
    state
        .access
        .store()
        .remove_user_key(&request.name, &fingerprint)
        .await?
        .ok_or_else(|| {
            Status::not_found(format!("user {} has no key {fingerprint}", request.name))
        })?;
    state.publisher.access_changed().await?;
    one_user(state, &request.name).await
}

async fn revoke_user(
    state: &ServerState,
    name: &str,
    revoked_by: &str,
) -> Result<RevokeUserResponse, Status> {
    let offboarded = access::offboard_user(state, name, revoked_by).await?;
    Ok(RevokeUserResponse {
        user: Some(one_user(state, name).await?),
        grants_removed: offboarded.revocation.grants_removed,
        keys_removed: offboarded.revocation.keys_removed,
        operator: offboarded.operator,
        policy_version: offboarded.policy_version,
    })
}

async fn grant(
    state: &ServerState,
    request: GrantRequest,
    created_by: &str,
) -> Result<GrantInfo, Status> {
    let now = state.clock.now_unix();
    let mut problems = Vec::new();
    if let Err(error) = validate_login(&request.login) {
        problems.push(error.to_string());
    }
    if let Err(error) = Selector::parse(&request.selector) {
        problems.push(
            AccessError::InvalidSelector {
                selector: request.selector.clone(),
                reason: error.to_string(),
            }
            .to_string(),
        );
    }
    let expires_at = parse_expiry(&request.expires, now).unwrap_or_else(|error| {
        problems.push(error.to_string());
        None
    });
    if !problems.is_empty() {
        return Err(Status::invalid_argument(problems.join("; ")));
    }
    active_user(state, &request.user).await?;
    let record = GrantRecord {
        id: format!("g-{}", &Uuid::new_v4().simple().to_string()[..10]),
        user: request.user,
        selector: request.selector.trim().to_owned(),
        login: request.login,
        expires_at,
        created_at: now,
        created_by: created_by.to_owned(),
    };
    state.access.store().insert_grant(&record).await?;
    state.publisher.access_changed().await?;
    let machines = state.store.machines().await?;
    Ok(grant_info(&record, &machines))
}

async fn revoke_grant(state: &ServerState, id: &str) -> Result<GrantInfo, Status> {
    let (grant, _version) = state
        .access
        .store()
        .remove_grant(id)
        .await?
        .ok_or_else(|| Status::not_found(format!("no grant with id {id}")))?;
    state.publisher.access_changed().await?;
    let machines = state.store.machines().await?;
    Ok(grant_info(&grant, &machines))
}

async fn access_status(
    state: &ServerState,
    request: AccessStatusRequest,
) -> Result<AccessStatusResponse, Status> {
    let current_version = state.access.current().version;
    let version = match request.version {
        0 => current_version,
        version => version,
    };
    let acks = state.access.machines();
    let connected = state.registry.views();
    let mut response = AccessStatusResponse {
        version,
        current_version,
        ..AccessStatusResponse::default()
    };
    let mut machines = state.store.machines().await?;
    machines.retain(|machine| machine.retired_at.is_none());
    machines.sort_by(|a, b| a.inventory.hostname.cmp(&b.inventory.hostname));
    for machine in &machines {
        let ack = acks.get(&machine.id);
        let applied_version = ack.map_or(0, |ack| ack.applied_version);
        let status = delivery_status(
            applied_version,
            version,
            connected.contains_key(&machine.id),
        );
        match status {
            DeliveryStatus::Applied => response.applied += 1,
            DeliveryStatus::Pending => response.pending += 1,
            DeliveryStatus::Unreachable => response.unreachable += 1,
        }
        response.machines.push(MachineAccessStatus {
            machine_id: machine.id.to_string(),
            hostname: machine.inventory.hostname.clone(),
            status: status.as_str().to_owned(),
            applied_version,
            applied_at: ack.map_or(0, |ack| ack.applied_at),
        });
    }
    Ok(response)
}

fn key_type_of(public_key: &str) -> String {
    public_key
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

async fn report(
    state: &ServerState,
    request: AccessReportRequest,
) -> Result<AccessReportResponse, Status> {
    let inputs = state.access.current();
    let all_machines = state.store.machines().await?;
    let machines: Vec<&MachineRecord> = if request.machine.is_empty() {
        all_machines
            .iter()
            .filter(|machine| machine.retired_at.is_none())
            .collect()
    } else {
        vec![find_machine(&all_machines, &request.machine)?]
    };
    let now = state.clock.now_unix();
    let mut response = AccessReportResponse::default();
    for machine in machines {
        let policy = compile_policy(&inputs, &machine.labels, &machine.zone, now);
        let record = state.access.machine(machine.id).unwrap_or_default();
        let granted_fingerprints: HashMap<&str, &str> = policy
            .logins
            .values()
            .flatten()
            .map(|key| (key.public_key.as_str(), key.fingerprint.as_str()))
            .collect();
        for row in access_report(&policy, &record.found, &inputs.owner_by_key) {
            if !request.user.is_empty() && row.user.as_deref() != Some(request.user.as_str()) {
                continue;
            }
            let fingerprint = granted_fingerprints
                .get(row.public_key.as_str())
                .map(|fingerprint| (*fingerprint).to_owned())
                .or_else(|| fingerprint_of_key_text(&row.public_key))
                .unwrap_or_else(|| "(unparseable key)".to_owned());
            response.entries.push(AccessReportEntry {
                machine_id: machine.id.to_string(),
                hostname: machine.inventory.hostname.clone(),
                login: row.login,
                user: row.user.unwrap_or_default(),
                fingerprint,
                key_type: key_type_of(&row.public_key),
                granted: row.granted,
                found: row.found,
                sources: row.sources,
                grant_id: row.grant_id.unwrap_or_default(),
                expires_at: row.expires_at.unwrap_or(0),
                drift: row.drift,
            });
        }
        response.missing_logins.extend(
            record
                .missing_logins
                .iter()
                .map(|login| format!("{}: {login}", machine.inventory.hostname)),
        );
    }
    Ok(response)
}

#[tonic::async_trait]
impl Users for AccessApi {
    async fn add_user(
        &self,
        request: Request<AddUserRequest>,
    ) -> Result<Response<UserInfo>, Status> {
        let arguments = {
            let request = request.get_ref();
            let fingerprints: Vec<String> = request
                .ssh_keys
                .iter()
                .map(|text| fingerprint_of_key_text(text).unwrap_or_else(|| "(invalid)".into()))
                .collect();
            json!({ "name": request.name, "keys": fingerprints })
        };
        let call = admit(&self.state, &request, AdminRpc::AddUser, arguments).await?;
        let state = Arc::clone(&self.state);
        let created_by = call.actor().to_owned();
        let request = request.into_inner();
        call.run(
            async move { add_user(&state, request, &created_by).await },
            |user| format!("{} key(s)", user.keys.len()),
        )
        .await
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ListUsers, json!({})).await?;
        Ok(Response::new(ListUsersResponse {
            users: user_infos(&self.state, None).await?,
        }))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<UserInfo>, Status> {
        admit(&self.state, &request, AdminRpc::GetUser, json!({})).await?;
        Ok(Response::new(
            one_user(&self.state, &request.get_ref().name).await?,
        ))
    }

    async fn add_user_key(
        &self,
        request: Request<AddUserKeyRequest>,
    ) -> Result<Response<UserInfo>, Status> {
        let arguments = json!({
            "name": request.get_ref().name,
            "key": fingerprint_of_key_text(&request.get_ref().ssh_key).unwrap_or_else(|| "(invalid)".into()),
        });
        let call = admit(&self.state, &request, AdminRpc::AddUserKey, arguments).await?;
        let state = Arc::clone(&self.state);
        let request = request.into_inner();
        call.run(async move { add_user_key(&state, request).await }, |_| {
            String::new()
        })
        .await
    }

    async fn remove_user_key(
        &self,
        request: Request<RemoveUserKeyRequest>,
    ) -> Result<Response<UserInfo>, Status> {
        let arguments = json!({ "name": request.get_ref().name, "key": request.get_ref().key });
        let call = admit(&self.state, &request, AdminRpc::RemoveUserKey, arguments).await?;
        let state = Arc::clone(&self.state);
        let request = request.into_inner();
        call.run(
            async move { remove_user_key(&state, request).await },
            |_| String::new(),
        )
        .await
    }

    async fn revoke_user(
        &self,
        request: Request<RevokeUserRequest>,
    ) -> Result<Response<RevokeUserResponse>, Status> {
        let name = request.get_ref().name.clone();
        let call = admit(
            &self.state,
            &request,
            AdminRpc::RevokeUser,
            json!({ "name": name }),
        )
        .await?;
        let state = Arc::clone(&self.state);
        let revoked_by = call.actor().to_owned();
        call.run(
            async move { revoke_user(&state, &name, &revoked_by).await },
            |response| {
                format!(
                    "{} grant(s), {} key(s) removed; operator: {}; policy version {}",
                    response.grants_removed,
                    response.keys_removed,
                    response.operator,
                    response.policy_version
                )
            },
        )
        .await
    }
}

#[tonic::async_trait]
impl Access for AccessApi {
    async fn grant(&self, request: Request<GrantRequest>) -> Result<Response<GrantInfo>, Status> {
        let arguments = {
            let request = request.get_ref();
            json!({
                "user": request.user,
                "selector": request.selector,
                "login": request.login,
                "expires": request.expires,
            })
        };
        let call = admit(&self.state, &request, AdminRpc::Grant, arguments).await?;
        let state = Arc::clone(&self.state);
        let created_by = call.actor().to_owned();
        let request = request.into_inner();
        call.run(
            async move { grant(&state, request, &created_by).await },
            |grant| {
                format!(
                    "grant {} ({} machine(s) match now)",
                    grant.id, grant.machines
                )
            },
        )
        .await
    }

    async fn revoke_grant(
        &self,
        request: Request<RevokeGrantRequest>,
    ) -> Result<Response<GrantInfo>, Status> {
        let id = request.get_ref().id.clone();
        let call = admit(
            &self.state,
            &request,
            AdminRpc::RevokeGrant,
            json!({ "id": id }),
        )
        .await?;
        let state = Arc::clone(&self.state);
        call.run(async move { revoke_grant(&state, &id).await }, |_| {
            String::new()
        })
        .await
    }

    async fn list_grants(
        &self,
        request: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ListGrants, json!({})).await?;
        let user = request.into_inner().user;
        let snapshot = self.state.access.store().access_snapshot().await?;
        let machines = self.state.store.machines().await?;
        Ok(Response::new(ListGrantsResponse {
            grants: snapshot
                .grants
                .iter()
                .filter(|grant| user.is_empty() || grant.user == user)
                .map(|grant| grant_info(grant, &machines))
                .collect(),
        }))
    }

    async fn access_status(
        &self,
        request: Request<AccessStatusRequest>,
    ) -> Result<Response<AccessStatusResponse>, Status> {
        admit(&self.state, &request, AdminRpc::AccessStatus, json!({})).await?;
        Ok(Response::new(
            access_status(&self.state, request.into_inner()).await?,
        ))
    }

    async fn access_report(
        &self,
        request: Request<AccessReportRequest>,
    ) -> Result<Response<AccessReportResponse>, Status> {
        admit(&self.state, &request, AdminRpc::AccessReport, json!({})).await?;
        Ok(Response::new(
            report(&self.state, request.into_inner()).await?,
        ))
    }
}
