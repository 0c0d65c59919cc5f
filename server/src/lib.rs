//! flotte-server: the fleet's coordinator. It owns the CA and enrollment, the
//! live registry of agent sessions, the durable store, and the admin API that
//! `flottectl` and integrations call — all on one gRPC port over mutual TLS.
//!
//! Shape: `run(config, listener, shutdown)` wires the pieces and serves until
//! `shutdown` is cancelled, so tests start a real server on `127.0.0.1:0`.
//! Domain modules (`ca`, `enrollment`, `store`, `registry`) never see proto
//! or tonic types except through `api`, which is the only place where errors
//! become gRPC statuses. Nothing here blocks the async runtime on disk: the
//! store runs on the blocking pool.
//!
//! No CLI code lives here: `flottectl` is its own crate and never links this
//! one. What both need (operator profiles, the role table, the audit chain,
//! image files) comes from `flotte-common`.

pub mod access;
pub mod alerts;
pub mod api;
pub mod auth;
pub mod backup;
pub mod ca;
pub mod clock;
pub mod config;
pub mod enrollment;
pub mod health;
pub mod images;
pub mod init;
pub mod limits;
pub mod metrics;
pub mod registry;
pub mod repair;
pub mod revocation;
pub mod rollout;
pub mod store;
pub mod tls;
pub mod transitions;

use std::sync::Arc;
use std::time::Duration;

use flotte_proto::identity::Identity;
use flotte_proto::v1::agent_session_server::AgentSessionServer;
use flotte_proto::v1::audit_server::AuditServer;
use flotte_proto::v1::enrollment_server::EnrollmentServer;
use flotte_proto::v1::images_server::ImagesServer;
use flotte_proto::v1::machines_server::MachinesServer;
use flotte_proto::v1::operators_server::OperatorsServer;
use flotte_proto::v1::release_keys_server::ReleaseKeysServer;
use flotte_proto::v1::rollouts_server::RolloutsServer;
use flotte_proto::v1::tokens_server::TokensServer;
use flotte_proto::v1::{
    disaster_recovery_server::DisasterRecoveryServer, repair_server::RepairServer,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::alerts::AlertDispatcher;
use crate::api::access::AccessApi;
use crate::api::admin::AdminApi;
use crate::api::enrollment::EnrollmentApi;
use crate::api::images::ImagesApi;
use crate::api::operators::OperatorsApi;
use crate::api::repair::RepairApi;
use crate::api::rollouts::RolloutsApi;
use crate::api::session::SessionApi;
use crate::api::trust::TrustApi;
use crate::ca::{CaError, CertificateAuthority};
use crate::clock::{Clock, SystemClock};
use crate::config::ServerConfig;
use crate::health::HealthTracker;
use crate::metrics::{RpcMetricsLayer, ServerMetrics};
use crate::registry::Registry;
use crate::revocation::Revocations;
use crate::store::{SqliteStore, Store, StoreError};
use crate::transitions::EventSender;
use flotte_proto::v1::access_server::AccessServer;
use flotte_proto::v1::users_server::UsersServer;

/// The server's own certificate is re-issued at every start (so SAN changes
/// in the config take effect on restart); this bounds how long one start lasts.
const SERVER_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Largest message accepted from an agent.
const MAX_AGENT_MESSAGE_BYTES: usize = 1024 * 1024;
/// After shutdown is requested, connections get this long to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
    #[error("gRPC reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot load the active rollouts: {0}")]
    Rollouts(String),
    #[error("cannot serve metrics on {address}: {source}")]
    MetricsListener {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Marks silent machines unreachable, once a second.
async fn watch_liveness(state: Arc<ServerState>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => state.health.check_liveness(state.clock.now_unix()),
        }
    }
}

/// Machines per (state, zone), for the `flotte_machines` gauge.
fn machines_by_state_and_zone(state: &ServerState) -> Vec<((String, String), i64)> {
    let mut counts: std::collections::BTreeMap<(String, String), i64> = Default::default();
    for machine in state.health.snapshot().values() {
        *counts
            .entry((machine.state.as_str().to_owned(), machine.zone.clone()))
            .or_default() += 1;
    }
    counts.into_iter().collect()
}

/// Serves `/metrics`; the bound address is written to `<data>/metrics.address`.
async fn serve_metrics(
    state: Arc<ServerState>,
    address: std::net::SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let listen_error = |source| ServerError::MetricsListener { address, source };
    let listener = TcpListener::bind(address).await.map_err(listen_error)?;
    let bound = listener.local_addr().map_err(listen_error)?;
    flotte_proto::files::write_atomically(
        &state.config.data_dir.join("metrics.address"),
        format!("{bound}\n").as_bytes(),
    )
    .map_err(listen_error)?;
    tracing::info!(address = %bound, "serving /metrics");
    let handler_state = Arc::clone(&state);
    tokio::spawn(flotte_proto::http1::serve(
        listener,
        Arc::new(move |_method: &str, path: &str| {
            flotte_proto::http1::metrics_response(path, || {
                handler_state.metrics.encode(
                    &machines_by_state_and_zone(&handler_state),
                    handler_state.registry.connected_count(),
                )
            })
        }),
        shutdown,
    ));
    Ok(())
}

/// Everything the API handlers and background tasks share.
pub struct ServerState {
    pub config: ServerConfig,
    pub ca: CertificateAuthority,
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    /// The deny list and live connections by identity (shared with `tls`).
    pub revocations: Arc<Revocations>,
    pub clock: Arc<dyn Clock>,
    pub health: HealthTracker,
    pub events: EventSender,
    pub metrics: ServerMetrics,
    pub alerts: AlertDispatcher,
    /// Quarantines, forensic bundles, remediation status (issue 8).
    pub repair: repair::RepairState,
    /// Active rollouts and the means to wake their loop.
    pub rollouts: Arc<rollout::runner::RolloutEngine>,
    /// Access for people: compiled policy inputs and machines' acknowledgements.
    pub access: Arc<access::AccessHub>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Path of the SQLite store inside a data dir.
pub fn store_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("flotte.db")
}

/// Periodically writes the last-seen time of every connected machine in one
/// batch, so that heartbeats never cost a store write each.
async fn flush_last_seen(state: Arc<ServerState>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(state.config.last_seen_flush_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let batch = state.registry.last_seen_batch();
        if let Err(error) = state.store.record_last_seen(&batch).await {
            tracing::warn!(%error, "last-seen flush failed");
        }
    }
    let batch = state.registry.last_seen_batch();
    if let Err(error) = state.store.record_last_seen(&batch).await {
        tracing::warn!(%error, "final last-seen flush failed");
    }
}

/// Serves the Flotte gRPC API on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let ca = CertificateAuthority::load(&config.data_dir)?;
    let server_identity = Identity::server(&config.trust_domain, &config.server_name);
    let (server_certificate, server_key) = ca.issue_server(
        &server_identity,
        &config.subject_alt_names,
        SERVER_CERTIFICATE_LIFETIME,
    )?;
    let mut chain = flotte_proto::transport::certificates_from_pem(
        "server certificate",
        &server_certificate.certificate_pem,
    )
    .map_err(tls::TlsSetupError::from)?;
    chain.push(rustls::pki_types::CertificateDer::from(
        ca.certificate_der().to_vec(),
    ));
    let key =
        flotte_proto::transport::private_key_from_pem("server key", &server_key.serialize_pem())
            .map_err(tls::TlsSetupError::from)?;
    let metrics = ServerMetrics::new();
    let store =
        SqliteStore::open_with_metrics(&store_path(&config.data_dir), metrics.store.clone())?;
    let revocations = Revocations::new(&store.denied_entries().await?);
    let tls_config =
        tls::server_config(ca.certificate_der(), chain, key, Arc::clone(&revocations))?;
    let clock = SystemClock;
    let (transition_sender, transition_receiver) = tokio::sync::mpsc::unbounded_channel();
    let health = HealthTracker::new(
        &store.machines().await?,
        clock.now_unix(),
        config.unreachable_after,
        transition_sender,
    );
    let alerts = AlertDispatcher::start(config.webhooks.clone(), metrics.clone(), shutdown.clone());
    let metrics_listen = config.metrics_listen;
    let repair = repair::RepairState::new(Arc::new(store.clone()), &config.data_dir);
    let rollouts = Arc::new(
        rollout::runner::RolloutEngine::load(Arc::new(store.clone()))
            .await
            .map_err(|error| ServerError::Rollouts(error.to_string()))?,
    );
    let access_hub = Arc::new(access::AccessHub::load(Arc::new(store.clone())).await?);
    let state = Arc::new(ServerState {
        config,
        ca,
        store: Arc::new(store),
        registry: Registry::new(),
        revocations,
        clock: Arc::new(clock),
        health,
        events: transitions::event_channel(),
        metrics,
        alerts,
        repair,
        rollouts,
        access: Arc::clone(&access_hub),
    });
    tokio::spawn(access_hub.run_flusher(shutdown.clone()));
    tokio::spawn(transitions::apply_transitions(
        Arc::clone(&state),
        transition_receiver,
    ));
    tokio::spawn(watch_liveness(Arc::clone(&state), shutdown.clone()));
    let remediation = tokio::spawn(repair::controller::run_remediation(
        Arc::clone(&state),
        shutdown.clone(),
    ));
    tokio::spawn(rollout::runner::run(Arc::clone(&state), shutdown.clone()));
    if let Some(address) = metrics_listen {
        serve_metrics(Arc::clone(&state), address, shutdown.clone()).await?;
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentSessionServer<SessionApi>>()
        .await;
    health_reporter
        .set_serving::<MachinesServer<AdminApi>>()
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

    let incoming = tls::accept_loop(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls_config)),
        state.config.trust_domain.clone(),
        Arc::clone(&state.revocations),
        shutdown.clone(),
    );
    let flusher = tokio::spawn(flush_last_seen(Arc::clone(&state), shutdown.clone()));
    let admin = AdminApi::new(Arc::clone(&state));
    let trust = TrustApi::new(Arc::clone(&state));
    let router = tonic::transport::Server::builder()
        .layer(RpcMetricsLayer {
            metrics: state.metrics.clone(),
        })
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection,
            require_identity.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection_v1alpha,
            require_identity,
        ))
        .add_service(EnrollmentServer::new(EnrollmentApi::new(Arc::clone(
            &state,
        ))))
        .add_service(
            AgentSessionServer::new(SessionApi::new(Arc::clone(&state)))
                // Reports are bounded by the agent (64 checks × 4 KiB of
                // output); anything near this limit is not a real agent.
                .max_decoding_message_size(MAX_AGENT_MESSAGE_BYTES),
        )
        .add_service(TokensServer::new(admin.clone()))
        .add_service(MachinesServer::new(admin))
        .add_service(ImagesServer::new(ImagesApi::new(Arc::clone(&state))))
        .add_service(OperatorsServer::new(OperatorsApi::new(Arc::clone(&state))))
        .add_service(ReleaseKeysServer::new(trust.clone()))
        .add_service(AuditServer::new(trust))
        .add_service(RepairServer::new(RepairApi::new(Arc::clone(&state))))
        .add_service(DisasterRecoveryServer::new(RepairApi::new(Arc::clone(
            &state,
        ))))
        .add_service(RolloutsServer::new(RolloutsApi::new(Arc::clone(&state))))
        .add_service(UsersServer::new(AccessApi::new(Arc::clone(&state))))
        .add_service(AccessServer::new(AccessApi::new(Arc::clone(&state))));

    tracing::info!(
        fingerprint = %state.ca.fingerprint(),
        identity = %server_identity,
        "flotte-server serving"
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
    shutdown.cancel();
    let _ = flusher.await;
    // Stops the replacement agents a `local` provider started.
    let _ = remediation.await;
    result?;
    Ok(())
}
