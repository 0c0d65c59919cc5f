//! flotte-server: the fleet's coordinator. It owns the CA and enrollment, the
//! live registry of agent sessions, the durable store, and the admin API that
//! `flottectl` and integrations call — all on one gRPC port over mutual TLS.
//!
//! Shape: `run(config, listener, shutdown)` wires the layers and serves until
//! `shutdown` is cancelled, so tests start a real server on `127.0.0.1:0`.
//! The layers point one way — `edge` (gRPC: guard, proto ↔ domain, one
//! service call, typed error → status) → `services` (the rules, one per
//! aggregate) → `live` (what this process holds: sessions, the publisher,
//! health, the loops) → `domain` (pure decisions) → `store` (traits over
//! domain types and their backends); `tests/layering.rs` fails when an import
//! points the wrong way or the wire leaks out of the edge. Root modules
//! (`ca`, `clock`, `config`, `metrics`, `alerts`, `audit`, `images`,
//! `forensics`, `join_tokens`, `limits`) are infrastructure any layer below
//! the edge may use; `allocator` holds the settings of jemalloc, which the
//! `flotte-server` binary links in place of the C library's malloc, and
//! reads its statistics for the metrics. Nothing here blocks
//! the async runtime on disk: the store runs on the blocking pool.

mod alert_payloads;
mod alerts;
pub mod allocator;
pub mod audit_key;
pub mod backup;
pub mod ca;
pub mod clock;
pub mod config;
mod domain;
mod edge;
mod forensics;
#[doc(hidden)]
pub mod fuzzing;
mod images;
pub mod init;
mod join_tokens;
pub mod limits;
mod live;
mod metrics;
pub mod recovery;
mod services;
mod store;

use std::sync::Arc;
use std::time::Duration;

use flotte_proto::identity::Identity;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::alerts::AlertDispatcher;
use crate::ca::{CaError, CertificateAuthority};
use crate::clock::{Clock, SystemClock};
use crate::config::ServerConfig;
use crate::live::health::HealthTracker;
use crate::live::registry::Registry;
use crate::live::revocation::Revocations;
use crate::live::transitions::EventSender;
use crate::metrics::ServerMetrics;
use crate::store::settings::open_store;
use crate::store::{Store, StoreError};

/// The server's own certificate is re-issued at every start (so SAN changes
/// in the config take effect on restart); this bounds how long one start lasts.
const SERVER_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] edge::tls::TlsSetupError),
    #[error(transparent)]
    Serve(#[from] edge::ServeError),
    #[error("cannot load the active rollouts: {0}")]
    Rollouts(String),
    #[error("cannot load the audit key: {0}")]
    AuditKey(#[from] audit_key::AuditKeyError),
    #[error("cannot serve metrics on {address}: {source}")]
    MetricsListener {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Marks silent machines unreachable, once a second: the machines whose
/// sessions this replica holds, and — on the leader — those no live
/// replica holds. So each machine has one judge fleet-wide.
async fn watch_liveness(state: Arc<ServerState>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let leading = state.leadership.fence().is_some();
        state
            .health
            .check_liveness(state.clock.now_unix(), &|machine| {
                state.registry.sender(machine).is_some()
                    || (leading && !state.replicas.held_elsewhere(machine))
            });
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

/// Machines whose current image is older than `image_max_age`, for the
/// `flotte_machines_on_old_images` gauge.
fn machines_on_old_images(state: &ServerState) -> u64 {
    let tracked = state.health.snapshot();
    domain::image_age::machines_on_old_images(
        tracked
            .values()
            .filter(|machine| machine.state != domain::health::MachineState::Retired)
            .map(|machine| state.image_ages.of_machine(machine)),
        state.clock.now_unix(),
        state.config.image_max_age,
    )
}

/// Every rollout state with how many rollouts are in it (the rollouts are
/// read from the store: one query per scrape); `None` if they cannot be read.
async fn rollouts_by_state(state: &ServerState) -> Option<Vec<(&'static str, i64)>> {
    let rollouts = match state.rollouts.list().await {
        Ok(rollouts) => rollouts,
        Err(error) => {
            tracing::warn!(%error, "/metrics: cannot read the rollouts");
            return None;
        }
    };
    Some(
        domain::rollout::RolloutState::ALL
            .iter()
            .map(|rollout_state| {
                let count = rollouts
                    .iter()
                    .filter(|rollout| rollout.state == *rollout_state)
                    .count();
                (
                    rollout_state.as_str(),
                    i64::try_from(count).unwrap_or(i64::MAX),
                )
            })
            .collect(),
    )
}

/// Machines connected to this replica that have not acknowledged the
/// current access policy version (what a revocation waits for).
fn access_policy_behind(state: &ServerState) -> u64 {
    let current = state.access.current().version;
    let acknowledged = state.access.machines();
    let behind = state
        .registry
        .views()
        .into_keys()
        .filter(|machine| {
            acknowledged
                .get(machine)
                .map_or(0, |record| record.applied_version)
                < current
        })
        .count();
    u64::try_from(behind).unwrap_or(u64::MAX)
}

/// What a `/metrics` scrape reads from live state.
async fn live_gauges(state: &ServerState) -> metrics::LiveGauges {
    let remediation = state.repair.status();
    metrics::LiveGauges {
        machines_by_state_and_zone: machines_by_state_and_zone(state),
        connected: state.registry.connected_count(),
        on_old_images: machines_on_old_images(state),
        rollouts_by_state: rollouts_by_state(state).await,
        breaker_open: remediation.breaker_open,
        breaker_zones: remediation.breaker_zones,
        access_policy_behind: access_policy_behind(state),
        allocator: crate::allocator::statistics()
            .inspect_err(|error| tracing::debug!(%error, "allocator gauges left as they were"))
            .ok(),
    }
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
    let scraped = Arc::clone(&state);
    tokio::spawn(flotte_proto::http::server::serve_metrics(
        listener,
        Arc::new(move || -> flotte_proto::http::server::MetricsText {
            let state = Arc::clone(&scraped);
            Box::pin(async move {
                let live = live_gauges(&state).await;
                state.metrics.encode(&live)
            })
        }),
        shutdown,
    ));
    Ok(())
}

/// Everything the API handlers and background tasks share.
pub struct ServerState {
    pub(crate) config: ServerConfig,
    pub(crate) ca: CertificateAuthority,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Arc<Registry>,
    /// The only builder and sender of desired states.
    pub(crate) publisher: Arc<live::publisher::Publisher>,
    /// The deny list and live connections by identity (shared with `tls`).
    pub(crate) revocations: Arc<Revocations>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) health: Arc<HealthTracker>,
    pub(crate) events: EventSender,
    pub(crate) metrics: ServerMetrics,
    pub(crate) alerts: AlertDispatcher,
    /// Quarantines, forensic bundles, remediation status (issue 8).
    pub(crate) repair: live::repair_state::RepairState,
    /// Active rollouts and the means to wake their loop.
    pub(crate) rollouts: Arc<live::rollout::RolloutEngine>,
    /// Access for people: compiled policy inputs and machines' acknowledgements.
    pub(crate) access: Arc<live::access_hub::AccessHub>,
    /// Signs audit checkpoints (kept in the data dir, never in the store).
    pub(crate) audit_key: Arc<audit_key::AuditKey>,
    /// What replicas share: leases, session holders, the change feed.
    pub(crate) replica_store: Arc<dyn store::replicas::ReplicaStore>,
    /// This replica among the others.
    pub(crate) replicas: Arc<live::replicas::ReplicaSet>,
    /// Whether this replica runs the leader-only loops now.
    pub(crate) leadership: Arc<live::leadership::Leadership>,
    /// Where changes are announced to the other replicas.
    pub(crate) feed: Arc<live::feed::Feed>,
    /// Image payloads (a directory, or PostgreSQL for replicas).
    pub(crate) blobs: Arc<dyn images::BlobStore>,
    /// Each machine's last image verification (issue 18).
    pub(crate) integrity: Arc<dyn store::integrity::IntegrityStore>,
    /// When each pushed image was built (image age, issue 18).
    pub(crate) image_ages: Arc<live::image_ages::ImageAges>,
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
    .map_err(edge::tls::TlsSetupError::from)?;
    chain.push(rustls::pki_types::CertificateDer::from(
        ca.certificate_der().to_vec(),
    ));
    let key =
        flotte_proto::transport::private_key_from_pem("server key", &server_key.serialize_pem())
            .map_err(edge::tls::TlsSetupError::from)?;
    let audit_key = Arc::new(audit_key::AuditKey::load_or_create(&config.data_dir)?);
    let metrics = ServerMetrics::new();
    let opened = open_store(&config.store, &config.data_dir, metrics.store.clone()).await?;
    let store = opened.store;
    let revocations = Revocations::new(&store.denied_entries().await?);
    let tls_config =
        edge::tls::server_config(ca.certificate_der(), chain, key, Arc::clone(&revocations))?;
    let clock = SystemClock;
    let (transition_sender, transition_receiver) = tokio::sync::mpsc::unbounded_channel();
    let health = Arc::new(HealthTracker::new(
        &store.machines().await?,
        clock.now_unix(),
        config.unreachable_after,
        transition_sender,
    ));
    let alerts = AlertDispatcher::start(config.webhooks.clone(), metrics.clone(), shutdown.clone());
    let metrics_listen = config.metrics_listen;
    let repair = live::repair_state::RepairState::new(opened.repair, opened.forensics);
    let rollouts = Arc::new(
        live::rollout::RolloutEngine::load(opened.rollouts)
            .await
            .map_err(|error| ServerError::Rollouts(error.to_string()))?,
    );
    let access_hub = Arc::new(live::access_hub::AccessHub::load(opened.access).await?);
    let image_ages = Arc::new(live::image_ages::ImageAges::load(store.as_ref()).await?);
    let registry = Arc::new(Registry::new());
    let feed = live::feed::Feed::new(&config.server_name, Arc::clone(&opened.replicas));
    let advertised = match &config.advertise_address {
        Some(address) => address.clone(),
        None => listener
            .local_addr()
            .map_or_else(|_| config.listen.to_string(), |bound| bound.to_string()),
    };
    let replicas = live::replicas::ReplicaSet::new(
        store::replicas::ReplicaRegistration {
            name: config.server_name.clone(),
            zone: config.zone.clone(),
            address: advertised,
            started_at: clock.now_unix(),
        },
        Arc::clone(&opened.replicas),
    );
    let leadership = live::leadership::Leadership::new(&config.server_name);
    let publisher = Arc::new(live::publisher::Publisher::new(
        Arc::clone(&registry) as Arc<dyn live::publisher::SessionFanOut>,
        live::publisher::PublisherSources {
            store: Arc::clone(&store),
            quarantines: Arc::clone(&repair.store),
            access: Arc::clone(&access_hub),
            health: Arc::clone(&health),
            clock: Arc::new(clock),
            report_interval: config.report_interval,
            feed: Arc::clone(&feed),
            replicas: Arc::clone(&replicas),
        },
    ));
    let state = Arc::new(ServerState {
        config,
        ca,
        store,
        registry,
        publisher,
        revocations,
        clock: Arc::new(clock),
        health,
        events: live::transitions::event_channel(),
        metrics,
        alerts,
        repair,
        rollouts,
        access: Arc::clone(&access_hub),
        audit_key,
        replica_store: Arc::clone(&opened.replicas),
        replicas: Arc::clone(&replicas),
        leadership: Arc::clone(&leadership),
        feed,
        blobs: Arc::clone(&opened.blobs),
        integrity: opened.integrity,
        image_ages,
    });
    // Subscribed before anything is served, so that no change announced
    // after the caches were loaded is missed.
    tokio::spawn(live::feed::run_feed(Arc::clone(&state), shutdown.clone()));
    tokio::spawn(live::feed::reconcile_held_sessions(
        Arc::clone(&state),
        shutdown.clone(),
    ));
    let replica_lease = tokio::spawn(replicas.run(shutdown.clone()));
    let leader_lease = tokio::spawn(leadership.run(Arc::clone(&opened.replicas), shutdown.clone()));
    tokio::spawn(access_hub.run_flusher(shutdown.clone()));
    tokio::spawn(live::transitions::apply_transitions(
        Arc::clone(&state),
        transition_receiver,
    ));
    tokio::spawn(watch_liveness(Arc::clone(&state), shutdown.clone()));
    live::audit_checkpoints::start_checkpointer(Arc::clone(&state), shutdown.clone()).await;
    let remediation = tokio::spawn(live::remediation::run_remediation(
        Arc::clone(&state),
        shutdown.clone(),
    ));
    tokio::spawn(live::rollout::run(Arc::clone(&state), shutdown.clone()));
    if let Some(address) = metrics_listen {
        serve_metrics(Arc::clone(&state), address, shutdown.clone()).await?;
    }

    let flusher = tokio::spawn(flush_last_seen(Arc::clone(&state), shutdown.clone()));
    tracing::info!(
        fingerprint = %state.ca.fingerprint(),
        identity = %server_identity,
        "flotte-server serving"
    );
    let result = edge::serve(Arc::clone(&state), listener, tls_config, shutdown.clone()).await;
    shutdown.cancel();
    let _ = flusher.await;
    // Stops the replacement agents a `local` provider started.
    let _ = remediation.await;
    // Gives the leader lease up and leaves the replica set, so that another
    // replica leads at once rather than after the lease.
    let _ = leader_lease.await;
    let _ = replica_lease.await;
    result?;
    Ok(())
}
