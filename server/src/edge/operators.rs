//! `flotte.v1.Operators`: creating operators from a CSR (the private key is
//! made where `flottectl` runs and never reaches the server), listing them,
//! changing roles and revoking them — which denies their identity and closes
//! their connections at once.

use std::sync::Arc;

use flotte_proto::identity::Identity;
use flotte_proto::v1::operators_server::Operators;
use flotte_proto::v1::{
    CreateOperatorRequest, CreateOperatorResponse, ListOperatorsRequest, ListOperatorsResponse,
    OperatorInfo, RenewOperatorCertificateRequest, RenewOperatorCertificateResponse,
    RevokeOperatorRequest, SetOperatorRoleRequest, WhoAmIRequest, WhoAmIResponse,
};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::edge::guard::admit;
use crate::services::operators::{self, NewOperator, OperatorError};
use crate::store::OperatorRecord;
use crate::ServerState;
use flotte_common::roles::AdminRpc;

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

/// The audit detail of a call that issued a certificate.
fn serial_detail(operator: Option<&OperatorInfo>) -> String {
    operator
        .map(|operator| format!("certificate serial {}", operator.certificate_serial))
        .unwrap_or_default()
}

impl From<OperatorError> for Status {
    fn from(error: OperatorError) -> Self {
        match error {
            OperatorError::InvalidName(_)
            | OperatorError::InvalidRole(_)
            | OperatorError::BadCsr(_) => Status::invalid_argument(error.to_string()),
            OperatorError::NotFound(_) => Status::not_found(error.to_string()),
            OperatorError::Revoked { .. } | OperatorError::LastAdmin(_) => {
                Status::failed_precondition(error.to_string())
            }
            OperatorError::AlreadyExists(_) => Status::already_exists(error.to_string()),
            OperatorError::Ca(_) => Status::internal(error.to_string()),
            OperatorError::Store(error) => error.into(),
        }
    }
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
            async move {
                let new_operator = NewOperator {
                    name: request.name,
                    role: request.role,
                    csr_pem: request.csr_pem,
                };
                let (record, certificate_pem) =
                    operators::create_operator(&state, new_operator, &created_by).await?;
                Ok(CreateOperatorResponse {
                    operator: Some(operator_info(&record, &state.config.trust_domain)),
                    certificate_pem,
                    ca_certificate_pem: state.ca.certificate_pem().to_owned(),
                    identity_uri: Identity::operator(&state.config.trust_domain, &record.name)
                        .uri(),
                })
            },
            |response| serial_detail(response.operator.as_ref()),
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
        call.run(
            async move {
                let updated = operators::set_role(&state, &request.name, &request.role).await?;
                Ok(operator_info(&updated, &state.config.trust_domain))
            },
            |_| String::new(),
        )
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
            async move {
                let revoked = operators::revoke(&state, &name, &revoked_by).await?;
                Ok(operator_info(&revoked, &state.config.trust_domain))
            },
            |_| String::new(),
        )
        .await
    }

    async fn renew_operator_certificate(
        &self,
        request: Request<RenewOperatorCertificateRequest>,
    ) -> Result<Response<RenewOperatorCertificateResponse>, Status> {
        let call = admit(
            &self.state,
            &request,
            AdminRpc::RenewOperatorCertificate,
            json!({}),
        )
        .await?;
        let state = Arc::clone(&self.state);
        // Only ever the caller's own certificate: the name comes from the
        // certificate the call was made with, not from the request.
        let name = call.actor().to_owned();
        let csr_pem = request.into_inner().csr_pem;
        call.run(
            async move {
                let (record, certificate_pem) =
                    operators::renew_certificate(&state, &name, &csr_pem).await?;
                Ok(RenewOperatorCertificateResponse {
                    operator: Some(operator_info(&record, &state.config.trust_domain)),
                    certificate_pem,
                    ca_certificate_pem: state.ca.certificate_pem().to_owned(),
                })
            },
            |response| serial_detail(response.operator.as_ref()),
        )
        .await
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let call = admit(&self.state, &request, AdminRpc::WhoAmI, json!({})).await?;
        Ok(Response::new(WhoAmIResponse {
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            server_name: self.state.config.server_name.clone(),
            operator: call.actor().to_owned(),
            role: call.role.to_string(),
        }))
    }
}
