//! The gRPC edge: thin service implementations that check the caller, convert
//! proto ↔ domain types and call the domain. The only place where domain
//! errors become `tonic::Status`.

pub mod access;
pub mod auth;
pub mod enrollment;
pub mod guard;
pub mod health_report;
pub mod images;
pub mod integrity;
pub mod machines;
pub mod methods;
pub mod operators;
pub mod repair;
pub mod rollouts;
pub mod session;
pub mod tls;
pub mod tokens;
pub mod trust;

use std::sync::Arc;
use std::time::Duration;

use flotte_proto::v1::access_server::AccessServer;
use flotte_proto::v1::agent_session_server::AgentSessionServer;
use flotte_proto::v1::audit_server::AuditServer;
use flotte_proto::v1::disaster_recovery_server::DisasterRecoveryServer;
use flotte_proto::v1::enrollment_server::EnrollmentServer;
use flotte_proto::v1::image_integrity_server::ImageIntegrityServer;
use flotte_proto::v1::images_server::ImagesServer;
use flotte_proto::v1::machines_server::MachinesServer;
use flotte_proto::v1::operators_server::OperatorsServer;
use flotte_proto::v1::release_keys_server::ReleaseKeysServer;
use flotte_proto::v1::repair_server::RepairServer;
use flotte_proto::v1::rollouts_server::RolloutsServer;
use flotte_proto::v1::tokens_server::TokensServer;
use flotte_proto::v1::users_server::UsersServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::edge::access::AccessApi;
use crate::edge::enrollment::EnrollmentApi;
use crate::edge::images::ImagesApi;
use crate::edge::machines::MachinesApi;
use crate::edge::methods::{
    CallHookLayer, MethodCatalog, MethodCatalogError, RpcMetrics, UnaryTimeout,
};
use crate::edge::operators::OperatorsApi;
use crate::edge::repair::RepairApi;
use crate::edge::rollouts::RolloutsApi;
use crate::edge::session::SessionApi;
use crate::edge::tokens::TokensApi;
use crate::edge::trust::TrustApi;
use crate::ServerState;
use tonic::Status;

use crate::edge::auth::AuthError;
use crate::services::enrollment::EnrollmentError;
use crate::store::StoreError;

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::NoCertificate | AuthError::Unusable(_) => {
                Status::unauthenticated(error.to_string())
            }
            AuthError::NotOperator(_)
            | AuthError::NotMachine(_)
            | AuthError::Revoked { .. }
            | AuthError::UnknownOperator(_)
            | AuthError::RoleTooLow { .. } => Status::permission_denied(error.to_string()),
            AuthError::NoConnectInfo => Status::internal(error.to_string()),
        }
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::AlreadyExists(_) => return Status::already_exists(error.to_string()),
            StoreError::DiskFull(_) => return disk_full_status(&error),
            StoreError::Unavailable(_) => {
                tracing::error!(%error, "the database is unavailable");
                return Status::unavailable(format!(
                    "the server's database is unavailable, nothing was changed; retry once it is back ({error})"
                ));
            }
            _ => {}
        }
        tracing::error!(%error, "store failure");
        Status::internal(format!("store failure: {error}"))
    }
}

/// A full disk on the server's side: the operator can act on it (free
/// space), and nothing was changed.
pub(crate) fn disk_full_status(error: &dyn std::fmt::Display) -> Status {
    tracing::error!(%error, "the server's disk is full");
    Status::resource_exhausted(format!(
        "the server's disk is full, nothing was changed; free space on the server host and retry ({error})"
    ))
}

impl From<EnrollmentError> for Status {
    fn from(error: EnrollmentError) -> Self {
        match &error {
            EnrollmentError::MalformedToken(_) | EnrollmentError::BadCsr(_) => {
                Status::invalid_argument(error.to_string())
            }
            EnrollmentError::ForeignToken { .. }
            | EnrollmentError::Refused(_)
            | EnrollmentError::ReenrollRefused(_) => Status::permission_denied(error.to_string()),
            EnrollmentError::Ca(_) => Status::internal(error.to_string()),
            EnrollmentError::Store(_) => {
                tracing::error!(%error, "store failure during enrollment");
                Status::internal(error.to_string())
            }
        }
    }
}

/// After shutdown is requested, connections get this long to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    MethodCatalog(#[from] MethodCatalogError),
    #[error("gRPC reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves every gRPC service on `listener` (TLS by `tls_config`, every limit
/// before authentication from the settings) until `shutdown` is cancelled.
pub async fn serve(
    state: Arc<ServerState>,
    listener: TcpListener,
    tls_config: rustls::ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentSessionServer<SessionApi>>()
        .await;
    health_reporter
        .set_serving::<MachinesServer<MachinesApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotte_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotte_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // Reflection reveals only the schema, but there is no reason to show it to
    // callers without an identity, or to revoked ones.
    let reflection_revocations = Arc::clone(&state.revocations);
    let require_identity =
        move |request: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
            let caller = auth::require_any_identity(&request)?;
            auth::require_not_revoked(&caller, &reflection_revocations)?;
            Ok(request)
        };

    let limits = &state.config.limits;
    let incoming = tls::accept_loop(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls_config)),
        state.config.trust_domain.clone(),
        Arc::clone(&state.revocations),
        tls::ConnectionLimits::from_settings(limits),
        shutdown.clone(),
    );
    let trust = TrustApi::new(Arc::clone(&state));
    let catalog = MethodCatalog::of_this_server()?;
    // Callers without a certificate reach health and enrollment only: both
    // get the small enrollment bound. Agents get theirs; admin calls theirs.
    let anonymous_bytes = limits.max_enrollment_message_bytes;
    let agent_bytes = limits.max_agent_message_bytes;
    let admin_bytes = limits.max_admin_message_bytes;
    let router = tonic::transport::Server::builder()
        .layer(CallHookLayer {
            hook: RpcMetrics {
                metrics: state.metrics.clone(),
                catalog: catalog.clone(),
            },
        })
        .layer(CallHookLayer {
            hook: UnaryTimeout {
                catalog,
                timeout: limits.unary_call_timeout,
            },
        })
        .max_concurrent_streams(limits.max_streams_per_connection)
        .concurrency_limit_per_connection(limits.max_requests_per_connection)
        .http2_max_header_list_size(limits.max_header_list_bytes)
        // A partitioned agent is silent, not gone: without an unanswered
        // ping its session (and, with replicas, its session claim) would
        // outlive it for minutes.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service.max_decoding_message_size(anonymous_bytes))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection.max_decoding_message_size(admin_bytes),
            require_identity.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection_v1alpha.max_decoding_message_size(admin_bytes),
            require_identity,
        ))
        .add_service(
            EnrollmentServer::new(EnrollmentApi::new(Arc::clone(&state)))
                .max_decoding_message_size(anonymous_bytes),
        )
        .add_service(
            // Reports are bounded by the agent (64 checks × 4 KiB of output);
            // anything near the default limit (1 MiB) is not a real agent.
            AgentSessionServer::new(SessionApi::new(Arc::clone(&state)))
                .max_decoding_message_size(agent_bytes),
        )
        .add_service(
            TokensServer::new(TokensApi::new(Arc::clone(&state)))
                .max_decoding_message_size(admin_bytes),
        )
        .add_service(
            MachinesServer::new(MachinesApi::new(Arc::clone(&state)))
                .max_decoding_message_size(admin_bytes),
        )
        .add_service(
            ImagesServer::new(ImagesApi::new(Arc::clone(&state)))
                .max_decoding_message_size(admin_bytes),
        )
        .add_service(
            OperatorsServer::new(OperatorsApi::new(Arc::clone(&state)))
                .max_decoding_message_size(admin_bytes),
        )
        .add_service(ReleaseKeysServer::new(trust.clone()).max_decoding_message_size(admin_bytes))
        .add_service(AuditServer::new(trust).max_decoding_message_size(admin_bytes))
        .add_service(
            RepairServer::new(RepairApi::new(Arc::clone(&state)))
                .max_decoding_message_size(admin_bytes),
        )
        .add_service(
            DisasterRecoveryServer::new(RepairApi::new(Arc::clone(&state)))
                .max_decoding_message_size(admin_bytes),
        )
        .add_service(
            RolloutsServer::new(RolloutsApi::new(Arc::clone(&state)))
                .max_decoding_message_size(admin_bytes),
        )
        .add_service(
            UsersServer::new(AccessApi::new(Arc::clone(&state)))
                .max_decoding_message_size(admin_bytes),
        )
        .add_service(
            AccessServer::new(AccessApi::new(Arc::clone(&state)))
                .max_decoding_message_size(admin_bytes),
        )
        .add_service(
            ImageIntegrityServer::new(crate::edge::integrity::IntegrityApi::new(Arc::clone(
                &state,
            )))
            .max_decoding_message_size(admin_bytes),
        );

    let shutdown_signal = shutdown.clone();
    let state_for_shutdown = Arc::clone(&state);
    let serve = router.serve_with_incoming_shutdown(ReceiverStream::new(incoming), async move {
        shutdown_signal.cancelled().await;
        // Long-lived agent streams would hold a graceful shutdown open forever.
        state_for_shutdown.registry.cancel_all();
    });
    tokio::pin!(serve);
    let result = tokio::select! {
        result = &mut serve => result,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("connections did not close within the shutdown grace period");
            Ok(())
        }
    };
    result?;
    Ok(())
}
