//! `flotte.v1.Users` and `flotte.v1.Access`: people, their SSH keys, grants
//! by selector, propagation status and the who-has-access report; plus the
//! session side of access: the policy a machine gets on connect, the
//! fan-out of a change to every connected agent, and agents' access acks.
//!
//! Every change commits to the store (bumping the global policy version),
//! refreshes the hub, then pushes the new policy on every live session with
//! `try_send` — one pass over the fleet per change, never per message.

use std::sync::Arc;

use flotte_proto::ssh_keys::fingerprint_of_key_text;
use flotte_proto::v1::access_server::Access;
use flotte_proto::v1::users_server::Users;
use flotte_proto::v1::AccessProblem as ProtoAccessProblem;
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

use crate::domain::access::MachinePolicy;
use crate::edge::guard::admit;
use crate::services::access::{
    self, AccessReport, AccessServiceError, AccessStatus, MatchedGrant, NewGrant, ReportedAccess,
    UserAccess,
};
use crate::store::{FoundKeysRecord, RefusedKeyRecord, UserKeyRecord};
use crate::ServerState;
use flotte_common::roles::AdminRpc;

impl From<AccessServiceError> for Status {
    fn from(error: AccessServiceError) -> Self {
        match error {
            AccessServiceError::Invalid(_)
            | AccessServiceError::KeyRefused(_)
            | AccessServiceError::KeysRefused(_) => Status::invalid_argument(error.to_string()),
            AccessServiceError::NoSuchUser(_)
            | AccessServiceError::NoSuchKey { .. }
            | AccessServiceError::NoSuchGrant(_) => Status::not_found(error.to_string()),
            AccessServiceError::UserRevoked { .. } => {
                Status::failed_precondition(error.to_string())
            }
            AccessServiceError::AlreadyExists(_) => Status::already_exists(error.to_string()),
            AccessServiceError::Machine(error) => error.into(),
            AccessServiceError::Store(error) => error.into(),
        }
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

/// An agent's access acknowledgement and findings, handed to the access
/// service (which bounds them) as read from the wire.
pub fn record_access_state(state: &ServerState, machine_id: Uuid, access: AccessState, now: i64) {
    let reported = ReportedAccess {
        applied_version: access.applied_version,
        missing_logins: access.missing_logins,
        found: access
            .found
            .into_iter()
            .map(|file| FoundKeysRecord {
                login: file.login,
                source: file.source,
                public_keys: file.public_keys,
                not_read_reason: given(&file.not_read_reason).map(str::to_owned),
            })
            .collect(),
        refused: access
            .refused
            .into_iter()
            .map(|refusal| RefusedKeyRecord {
                login: refusal.login,
                user: refusal.user,
                grant_id: refusal.grant_id,
                key: refusal.key,
                reason: refusal.reason,
            })
            .collect(),
    };
    access::record_access_state(state, machine_id, reported, now);
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

fn grant_info(matched: MatchedGrant) -> GrantInfo {
    let grant = matched.grant;
    GrantInfo {
        id: grant.id,
        user: grant.user,
        selector: grant.selector,
        login: grant.login,
        expires_at: grant.expires_at.unwrap_or(0),
        created_at: grant.created_at,
        created_by: grant.created_by,
        machines: matched.machines,
    }
}

fn user_info(access: UserAccess) -> UserInfo {
    UserInfo {
        name: access.user.name,
        keys: access.keys.iter().map(key_info).collect(),
        created_at: access.user.created_at,
        created_by: access.user.created_by,
        revoked_at: access.user.revoked_at.unwrap_or(0),
        grants: access.grants.into_iter().map(grant_info).collect(),
    }
}

/// An empty string on the wire means "not given".
fn given(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

async fn revoke_user(
    state: &ServerState,
    name: &str,
    revoked_by: &str,
) -> Result<RevokeUserResponse, AccessServiceError> {
    let offboarded = access::offboard_user(state, name, revoked_by).await?;
    Ok(RevokeUserResponse {
        user: Some(user_info(access::user(state, name).await?)),
        grants_removed: offboarded.revocation.grants_removed,
        keys_removed: offboarded.revocation.keys_removed,
        operator: offboarded.operator,
        policy_version: offboarded.policy_version,
    })
}

fn access_status_response(status: AccessStatus) -> AccessStatusResponse {
    AccessStatusResponse {
        version: status.version,
        current_version: status.current_version,
        applied: status.applied,
        pending: status.pending,
        unreachable: status.unreachable,
        machines: status
            .machines
            .into_iter()
            .map(|machine| MachineAccessStatus {
                machine_id: machine.machine_id.to_string(),
                hostname: machine.hostname,
                status: machine.status.as_str().to_owned(),
                applied_version: machine.applied_version,
                applied_at: machine.applied_at,
                refused: machine.refused,
            })
            .collect(),
    }
}

fn access_report_response(report: AccessReport) -> AccessReportResponse {
    AccessReportResponse {
        entries: report
            .rows
            .into_iter()
            .map(|entry| AccessReportEntry {
                machine_id: entry.machine_id.to_string(),
                hostname: entry.hostname,
                login: entry.row.login,
                user: entry.row.user.unwrap_or_default(),
                fingerprint: entry.fingerprint,
                key_type: entry.key_type,
                granted: entry.row.granted,
                found: entry.row.found,
                sources: entry.row.sources,
                grant_id: entry.row.grant_id.unwrap_or_default(),
                expires_at: entry.row.expires_at.unwrap_or(0),
                drift: entry.row.drift,
            })
            .collect(),
        missing_logins: report.missing_logins,
        problems: report
            .problems
            .into_iter()
            .map(|problem| ProtoAccessProblem {
                machine_id: problem.machine_id.to_string(),
                hostname: problem.hostname,
                login: problem.login,
                kind: problem.kind.as_str().to_owned(),
                user: problem.user,
                grant_id: problem.grant_id,
                subject: problem.subject,
                reason: problem.reason,
            })
            .collect(),
    }
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
            async move {
                let added =
                    access::add_user(&state, &request.name, &request.ssh_keys, &created_by).await?;
                Ok(user_info(added))
            },
            |user| format!("{} key(s)", user.keys.len()),
        )
        .await
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ListUsers, json!({})).await?;
        let users = access::users(&self.state, None).await?;
        Ok(Response::new(ListUsersResponse {
            users: users.into_iter().map(user_info).collect(),
        }))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<UserInfo>, Status> {
        admit(&self.state, &request, AdminRpc::GetUser, json!({})).await?;
        let user = access::user(&self.state, &request.get_ref().name).await?;
        Ok(Response::new(user_info(user)))
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
        call.run(
            async move {
                let user = access::add_user_key(&state, &request.name, &request.ssh_key).await?;
                Ok(user_info(user))
            },
            |_| String::new(),
        )
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
            async move {
                let user = access::remove_user_key(&state, &request.name, &request.key).await?;
                Ok(user_info(user))
            },
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
            async move { Ok(revoke_user(&state, &name, &revoked_by).await?) },
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
        let GrantRequest {
            user,
            selector,
            login,
            expires,
        } = request.into_inner();
        let request = NewGrant {
            user,
            selector,
            login,
            expires,
        };
        call.run(
            async move {
                let granted = access::grant(&state, request, &created_by).await?;
                Ok(grant_info(granted))
            },
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
        call.run(
            async move {
                let revoked = access::revoke_grant(&state, &id).await?;
                Ok(grant_info(revoked))
            },
            |_| String::new(),
        )
        .await
    }

    async fn list_grants(
        &self,
        request: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ListGrants, json!({})).await?;
        let user = request.into_inner().user;
        let grants = access::grants(&self.state, given(&user)).await?;
        Ok(Response::new(ListGrantsResponse {
            grants: grants.into_iter().map(grant_info).collect(),
        }))
    }

    async fn access_status(
        &self,
        request: Request<AccessStatusRequest>,
    ) -> Result<Response<AccessStatusResponse>, Status> {
        admit(&self.state, &request, AdminRpc::AccessStatus, json!({})).await?;
        // Version 0 on the wire asks for the current version.
        let version = Some(request.into_inner().version).filter(|version| *version != 0);
        let status = access::access_status(&self.state, version).await?;
        Ok(Response::new(access_status_response(status)))
    }

    async fn access_report(
        &self,
        request: Request<AccessReportRequest>,
    ) -> Result<Response<AccessReportResponse>, Status> {
        admit(&self.state, &request, AdminRpc::AccessReport, json!({})).await?;
        let request = request.into_inner();
        let report =
            access::report(&self.state, given(&request.machine), given(&request.user)).await?;
        Ok(Response::new(access_report_response(report)))
    }
}
