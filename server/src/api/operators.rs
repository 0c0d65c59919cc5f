//! `flotte.v1.Operators`: creating operators from a CSR (the private key is
//! made where `flottectl` runs and never reaches the server), listing them,
//! changing roles and revoking them — which denies their identity and closes
//! their connections at once.

use std::sync::Arc;
use std::time::Duration;

use flotte_proto::identity::{is_valid_segment, Identity};
use flotte_proto::v1::operators_server::Operators;
use flotte_proto::v1::{
    CreateOperatorRequest, CreateOperatorResponse, ListOperatorsRequest, ListOperatorsResponse,
    OperatorInfo, RevokeOperatorRequest, SetOperatorRoleRequest,
};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::api::admin::REVOCATION_GRACE;
use crate::api::guard::admit;
use crate::ca::CaError;
use crate::clock::to_unix;
use crate::revocation::denial;
use crate::roles::{AdminRpc, Role};
use crate::store::{DeniedKind, OperatorChange, OperatorRecord};
use crate::ServerState;

/// Operator certificates are long-lived credentials of people; revocation,
/// not expiry, is what ends them early.
pub const OPERATOR_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct OperatorsApi {
    state: Arc<ServerState>,
}

impl OperatorsApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        OperatorsApi { state }
    }
}

fn operator_info(record: &OperatorRecord, trust_domain: &str) -> OperatorInfo {
    OperatorInfo {
        name: record.name.clone(),
        role: record.role.to_string(),
        created_at: record.created_at,
        created_by: record.created_by.clone(),
        certificate_serial: record.certificate_serial.clone(),
        certificate_not_after: record.certificate_not_after,
        revoked_at: record.revoked_at.unwrap_or(0),
        identity_uri: Identity::operator(trust_domain, &record.name).uri(),
    }
}

fn parse_role(text: &str) -> Result<Role, Status> {
    text.parse::<Role>()
        .map_err(|error| Status::invalid_argument(error.to_string()))
}

/// The stored operator `name`, refusing unknown and revoked ones.
async fn active_operator(state: &ServerState, name: &str) -> Result<OperatorRecord, Status> {
    let operator = state
        .store
        .operator(name)
        .await?
        .ok_or_else(|| Status::not_found(format!("no operator named {name}")))?;
    if let Some(revoked_at) = operator.revoked_at {
        return Err(Status::failed_precondition(format!(
            "operator {name} was revoked at {revoked_at} (unix)"
        )));
    }
    Ok(operator)
}

/// The operator a store change left, or why there is none. The store
/// refuses to remove the last active admin: nobody could then manage
/// operators, tokens or revocation without a new `init`.
fn changed_operator(change: OperatorChange, name: &str) -> Result<OperatorRecord, Status> {
    match change {
        OperatorChange::Changed(operator) => Ok(operator),
        OperatorChange::NotFound => Err(Status::not_found(format!("no operator named {name}"))),
        OperatorChange::LastAdmin(_) => Err(Status::failed_precondition(format!(
            "{name} is the last admin: create or promote another admin first"
        ))),
    }
}

async fn create_operator(
    state: &ServerState,
    request: CreateOperatorRequest,
    created_by: &str,
) -> Result<CreateOperatorResponse, Status> {
    if !is_valid_segment(&request.name) {
        return Err(Status::invalid_argument(format!(
            "operator name {:?} must be non-empty letters, digits, '.', '_' or '-'",
            request.name
        )));
    }
    let role = parse_role(&request.role)?;
    if state.store.operator(&request.name).await?.is_some() {
        return Err(Status::already_exists(format!(
            "operator {} already exists (names of revoked operators are not reused)",
            request.name
        )));
    }
    let identity = Identity::operator(&state.config.trust_domain, &request.name);
    let issued = state
        .ca
        .issue_client_from_csr(&request.csr_pem, &identity, OPERATOR_CERTIFICATE_LIFETIME)
        .map_err(|error| match error {
            CaError::BadCsr(_) => Status::invalid_argument(error.to_string()),
            other => Status::internal(other.to_string()),
        })?;
    let record = OperatorRecord {
        name: request.name,
        role,
        created_at: state.clock.now_unix(),
        created_by: created_by.to_owned(),
        certificate_serial: issued.serial_hex,
        certificate_not_after: to_unix(issued.not_after),
        revoked_at: None,
    };
    state.store.insert_operator(&record).await?;
    tracing::info!(operator = %identity, %role, %created_by, "operator created");
    Ok(CreateOperatorResponse {
        operator: Some(operator_info(&record, &state.config.trust_domain)),
        certificate_pem: issued.certificate_pem,
        ca_certificate_pem: state.ca.certificate_pem().to_owned(),
        identity_uri: identity.uri(),
    })
}

async fn set_role(
    state: &ServerState,
    request: SetOperatorRoleRequest,
) -> Result<OperatorInfo, Status> {
    let role = parse_role(&request.role)?;
    active_operator(state, &request.name).await?;
    let change = state.store.set_operator_role(&request.name, role).await?;
    let updated = changed_operator(change, &request.name)?;
    Ok(operator_info(&updated, &state.config.trust_domain))
}

/// Revokes the operator `name` (also used by user off-boarding).
pub(crate) async fn revoke(
    state: &ServerState,
    name: &str,
    revoked_by: &str,
) -> Result<OperatorInfo, Status> {
    let operator = active_operator(state, name).await?;
    let now = state.clock.now_unix();
    let identity_uri = Identity::operator(&state.config.trust_domain, name).uri();
    let reason = format!("operator {name} was revoked by {revoked_by}");
    let denied = denial(
        &reason,
        now,
        [
            (DeniedKind::Identity, identity_uri.clone()),
            (DeniedKind::Serial, operator.certificate_serial.clone()),
        ],
    );
    let change = state.store.revoke_operator(name, now, &denied).await?;
    let revoked = changed_operator(change, name)?;
    state
        .revocations
        .enforce(&denied, &identity_uri, REVOCATION_GRACE);
    tracing::warn!(operator = %identity_uri, %revoked_by, "operator revoked");
    Ok(operator_info(&revoked, &state.config.trust_domain))
}

#[tonic::async_trait]
impl Operators for OperatorsApi {
    async fn create_operator(
        &self,
        request: Request<CreateOperatorRequest>,
    ) -> Result<Response<CreateOperatorResponse>, Status> {
        let arguments = json!({ "name": request.get_ref().name, "role": request.get_ref().role });
        let call = admit(&self.state, &request, AdminRpc::CreateOperator, arguments).await?;
        let state = Arc::clone(&self.state);
        let created_by = call.actor().to_owned();
        let request = request.into_inner();
        call.run(
            async move { create_operator(&state, request, &created_by).await },
            |response| {
                response
                    .operator
                    .as_ref()
                    .map(|operator| format!("certificate serial {}", operator.certificate_serial))
                    .unwrap_or_default()
            },
        )
        .await
    }

    async fn list_operators(
        &self,
        request: Request<ListOperatorsRequest>,
    ) -> Result<Response<ListOperatorsResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ListOperators, json!({})).await?;
        let trust_domain = &self.state.config.trust_domain;
        let operators = self.state.store.operators().await?;
        Ok(Response::new(ListOperatorsResponse {
            operators: operators
                .iter()
                .map(|operator| operator_info(operator, trust_domain))
                .collect(),
        }))
    }

    async fn set_operator_role(
        &self,
        request: Request<SetOperatorRoleRequest>,
    ) -> Result<Response<OperatorInfo>, Status> {
        let arguments = json!({ "name": request.get_ref().name, "role": request.get_ref().role });
        let call = admit(&self.state, &request, AdminRpc::SetOperatorRole, arguments).await?;
        let state = Arc::clone(&self.state);
        let request = request.into_inner();
        call.run(async move { set_role(&state, request).await }, |_| {
            String::new()
        })
        .await
    }

    async fn revoke_operator(
        &self,
        request: Request<RevokeOperatorRequest>,
    ) -> Result<Response<OperatorInfo>, Status> {
        let name = request.get_ref().name.clone();
        let call = admit(
            &self.state,
            &request,
            AdminRpc::RevokeOperator,
            json!({ "name": name }),
        )
        .await?;
        let state = Arc::clone(&self.state);
        let revoked_by = call.actor().to_owned();
        call.run(
            async move { revoke(&state, &name, &revoked_by).await },
            |_| String::new(),
        )
        .await
    }
}
