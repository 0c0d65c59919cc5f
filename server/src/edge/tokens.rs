//! `flotte.v1.Tokens`: join tokens for enrollment. Every call passes the
//! gate in `guard`; the rules live in `services::tokens`.

use std::sync::Arc;

use flotte_proto::v1::tokens_server::Tokens;
use flotte_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest, RevokeTokenResponse, TokenInfo,
};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::edge::guard::admit;
use crate::services::tokens::{self, TokenError, TokenRequest};
use crate::store::JoinTokenRecord;
use crate::ServerState;
use flotte_common::roles::AdminRpc;

#[derive(Debug, Clone)]
pub struct TokensApi {
    state: Arc<ServerState>,
}

impl TokensApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        TokensApi { state }
    }
}

impl From<TokenError> for Status {
    fn from(error: TokenError) -> Self {
        match error {
            TokenError::Invalid(_) => Status::invalid_argument(error.to_string()),
            TokenError::NotFound(_) => Status::not_found(error.to_string()),
            TokenError::Random => Status::internal(error.to_string()),
            TokenError::Store(error) => error.into(),
        }
    }
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
        revoked_at: record.revoked_at.unwrap_or(0),
        last_used_at: record.last_used_at.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl Tokens for TokensApi {
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
                let (record, token) = tokens::create_token(
                    &state,
                    TokenRequest {
                        labels: request.labels.into_iter().collect(),
                        zone: request.zone,
                        ttl_seconds: request.ttl_seconds,
                        uses: request.uses,
                    },
                )
                .await?;
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
                let record = tokens::revoke_token(&state, &id).await?;
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
