//! flotte-agent: the small, long-running process on every machine. It enrolls
//! once (key generated here, never sent), keeps one mTLS session with the
//! server, reports inventory and liveness, applies the desired state it is
//! sent, and renews its short-lived certificate before it expires.
//!
//! `run(config, shutdown)` is the whole agent; `main` only parses arguments.
//! Each I/O boundary (persistence, network session) is its own module so the
//! load generator can reuse enrollment and sessions without touching disk.
//! Nothing here may panic on bad input from the server or the disk.

pub mod access;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod enroll;
pub mod health;
pub mod identity;
pub mod image;
pub mod inventory;
pub mod metrics;
pub mod repair;
pub mod session;
pub mod state;
pub mod system;
pub mod user_files;

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::enroll::{enroll, reenroll, EnrollError};
use flotte_proto::data_dir_lock::{describe_io_error, lock_data_dir, DataDirLockError};
use flotte_proto::files;
use std::sync::Arc;

use crate::identity::MachineIdentity;
use crate::image::fetch::GrpcImageSource;
use crate::image::layout::ImageLayout;
use crate::image::service::Service;
use crate::image::swap::ImageSettings;
use crate::metrics::AgentMetrics;
use crate::session::{run_session, AgentState, SessionEnd, SessionStats};
use crate::state::{DiskPersistence, PersistenceError};

/// A session that stayed up this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("this machine is not enrolled and no join token was given (set join_token or --join)")]
    NotEnrolled,
    #[error("enrollment failed: {0}")]
    Enroll(#[from] EnrollError),
    #[error("re-enrollment after certificate expiry was refused: {0}. Enroll again with a new join token (remove the identity directory first)")]
    ReenrollRefused(EnrollError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Persistence(#[from] PersistenceError),
    #[error(transparent)]
    Access(#[from] access::AccessError),
    /// Final: the server will never take this machine again.
    #[error("{0}")]
    Decommissioned(String),
    #[error("cannot use the data dir: {0}")]
    DataDir(String),
    #[error(transparent)]
    Locked(#[from] DataDirLockError),
    #[error("cannot prepare the image directories: {0}")]
    Images(std::io::Error),
    #[error("cannot serve metrics on {address}: {source}")]
    MetricsListener {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Serves `/metrics` on `address`; the bound address (port 0 allowed) is
/// written to `<data_dir>/metrics.address` for scripts and tests.
async fn serve_metrics(
    address: std::net::SocketAddr,
    data_dir: &std::path::Path,
    metrics: AgentMetrics,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let listen_error = |source| AgentError::MetricsListener { address, source };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(listen_error)?;
    let bound = listener.local_addr().map_err(listen_error)?;
    flotte_proto::files::write_atomically(
        &data_dir.join("metrics.address"),
        format!("{bound}\n").as_bytes(),
    )
    .map_err(listen_error)?;
    tracing::info!(address = %bound, "serving /metrics");
    tokio::spawn(flotte_proto::http::server::serve_metrics(
        listener,
        std::sync::Arc::new(move || -> flotte_proto::http::server::MetricsText {
            Box::pin(std::future::ready(metrics.encode()))
        }),
        shutdown,
    ));
    Ok(())
}

/// Waits `delay` unless shutdown comes first; true if shutdown came.
async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// Tries each server in turn, with backoff between rounds, until `attempt`
/// succeeds or fails permanently. `None` means shutdown was requested.
async fn with_each_server<T, F, Fut>(
    config: &AgentConfig,
    shutdown: &CancellationToken,
    what: &str,
    mut attempt: F,
) -> Result<Option<T>, EnrollError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, EnrollError>>,
{
    let mut backoff = Backoff::new(
        config.reconnect_initial_backoff,
        config.reconnect_max_backoff,
    );
    loop {
        for address in &config.servers {
            match attempt(address.clone()).await {
                Ok(value) => return Ok(Some(value)),
                Err(error) if error.is_transient() => {
                    tracing::warn!(%error, "{what}: server unreachable, trying the next one");
                }
                Err(error) => return Err(error),
            }
        }
        if sleep_or_shutdown(backoff.next_delay(), shutdown).await {
            return Ok(None);
        }
    }
}

/// Loads the identity, or enrolls with the join token on first start.
async fn ensure_identity(
    config: &AgentConfig,
    hostname: &str,
    shutdown: &CancellationToken,
) -> Result<Option<MachineIdentity>, AgentError> {
    if let Some(identity) = MachineIdentity::load(&config.data_dir)? {
        if config.join_token.is_some() {
            tracing::info!(identity = %identity.identity, "already enrolled; the join token is not used");
        }
        return Ok(Some(identity));
    }
    let token = config.join_token.as_ref().ok_or(AgentError::NotEnrolled)?;
    let enrolled = with_each_server(config, shutdown, "enrollment", |address| async move {
        enroll(&address, token, hostname).await
    })
    .await?;
    if let Some(identity) = &enrolled {
        identity.save(&config.data_dir)?;
        tracing::info!(identity = %identity.identity, "enrolled");
    }
    Ok(enrolled)
}

/// Runs the agent until `shutdown` is cancelled or a permanent error occurs.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let hostname = config.hostname.clone().unwrap_or_else(inventory::hostname);
    // 0711, as the unit's StateDirectoryMode: the service, run as an
    // unprivileged user, must pass through to images/current; nothing in
    // the data dir can be listed, and its secrets have their own 0700/0600.
    files::create_passable_dir(&config.data_dir)
        .map_err(|error| AgentError::DataDir(describe_io_error(&config.data_dir, &error)))?;
    // Held until `run` returns: a second agent on this data dir would stop
    // this one's service and replace its session every second.
    let _data_dir_lock = lock_data_dir(&config.data_dir, "flotte-agent")?;
    let Some(identity) = ensure_identity(&config, &hostname, &shutdown).await? else {
        return Ok(());
    };
    let persistence = DiskPersistence::new(&config.data_dir);
    let metrics = AgentMetrics::new();
    if let Some(address) = config.metrics_listen {
        serve_metrics(address, &config.data_dir, metrics.clone(), shutdown.clone()).await?;
    }
    let health = health::start_monitor(
        config.checks.clone(),
        config.system.clone(),
        config.system_interval,
        metrics.clone(),
        shutdown.clone(),
    );
    let (identity_watch, identity_updates) = tokio::sync::watch::channel(identity.clone());
    let layout = ImageLayout::new(&config.data_dir);
    let service = Service::start(
        config.service.clone(),
        layout.current_link(),
        shutdown.clone(),
    );
    let quarantine_sink = Arc::new(repair::GrpcBundleSink {
        servers: config.servers.clone(),
        identity: identity_updates.clone(),
    });
    let service_log = match &config.service {
        image::service::ServiceMode::Supervised { log_path, .. } => Some(log_path.clone()),
        _ => None,
    };
    let quarantine = repair::start(
        repair::QuarantineManager {
            settings: config.quarantine.clone(),
            data_dir: config.data_dir.clone(),
            sources: repair::forensics::CollectionSources {
                data_dir: config.data_dir.clone(),
                service_log,
                mounts: config.system.mounts.clone(),
                proc_root: std::path::PathBuf::from("/proc"),
                omit_command_lines: config.quarantine.omit_command_lines,
            },
            service: service.clone(),
            health: health.clone(),
            sink: quarantine_sink,
            hostname: hostname.clone(),
        },
        shutdown.clone(),
    );
    let images = image::swap::start(
        ImageSettings {
            release_keys: config.release_keys.clone(),
            unpack: config.unpack.clone(),
            keep_images: config.keep_images,
            verify_deadline: config.verify_deadline,
            soak: config.soak,
            config_checks: config.checks.clone(),
            keep_drifted_max_bytes: config.keep_drifted_max_bytes,
        },
        layout.clone(),
        Arc::new(GrpcImageSource {
            servers: config.servers.clone(),
            identity: identity_updates,
        }),
        service,
        shutdown.clone(),
    )
    .map_err(AgentError::Images)?;
    let integrity = image::integrity::start(
        config.integrity.clone(),
        layout,
        session::ImageManager::status(&images),
        Arc::new(images.clone()),
        shutdown.clone(),
    );
    let access = match &config.access {
        Some(settings) => {
            let enforcer = access::AccessEnforcer::open(settings.clone(), &config.data_dir)?;
            tokio::spawn(Arc::clone(&enforcer).run(shutdown.clone()));
            Some(enforcer as Arc<dyn session::AccessHandler>)
        }
        None => None,
    };
    let mut state = AgentState {
        identity,
        applied: persistence.load_applied()?,
        hostname: Some(hostname),
        default_report_interval: config.report_interval,
        health,
        metrics: metrics.clone(),
        images: Some(Arc::new(images)),
        identity_watch: Some(identity_watch),
        quarantine: Some(quarantine),
        access,
        integrity: Some(integrity),
    };
    let mut backoff = Backoff::new(
        config.reconnect_initial_backoff,
        config.reconnect_max_backoff,
    );
    let mut stats = SessionStats::default();
    // A random first server spreads a fleet over the replicas; on failure
    // the agent moves to the next one, after a jittered backoff.
    let mut server_index = crate::backoff::random_index(config.servers.len());
    loop {
        if state.identity.is_expired(SystemTime::now()) {
            tracing::warn!(not_after = ?state.identity.not_after, "certificate expired while the server was unreachable; re-enrolling");
            let expired = state.identity.clone();
            let renewed = with_each_server(&config, &shutdown, "re-enrollment", |address| {
                let expired = expired.clone();
                async move { reenroll(&address, &expired).await }
            })
            .await
            .map_err(AgentError::ReenrollRefused)?;
            let Some(renewed) = renewed else {
                return Ok(());
            };
            renewed.save_certificate(&config.data_dir)?;
            tracing::info!(not_after = ?renewed.not_after, "re-enrolled");
            if let Some(identity_watch) = &state.identity_watch {
                identity_watch.send_replace(renewed.clone());
            }
            state.identity = renewed;
        }
        let address = &config.servers[server_index % config.servers.len()];
        let started = tokio::time::Instant::now();
        let identity_uri = state.identity.identity.uri();
        let session_metrics = metrics.clone();
        let mut on_established = || {
            session_metrics.set_connected(true);
            tracing::info!(server = %address, identity = %identity_uri, "session established");
        };
        let outcome = run_session(
            address,
            &mut state,
            &persistence,
            &mut stats,
            &shutdown,
            &mut on_established,
        )
        .await;
        metrics.set_connected(false);
        if let Some(access) = &state.access {
            access.set_contact(false);
        }
        match outcome {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::ClosedByServer(reason)) => {
                tracing::warn!(server = %address, %reason, "session closed by the server");
            }
            Err(error) if error.is_decommissioned() => {
                metrics.record_session_failure();
                tracing::error!(%error, "stopping: this machine was decommissioned and will not reconnect (to bring it back, empty its data dir and enroll it with a new join token)");
                return Err(AgentError::Decommissioned(error.to_string()));
            }
            Err(error) if error.is_refusal() => {
                metrics.record_session_failure();
                tracing::error!(%error, "session refused");
            }
            Err(error) => {
                metrics.record_session_failure();
                tracing::warn!(%error, "session failed");
            }
        }
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        server_index = server_index.wrapping_add(1);
        if sleep_or_shutdown(backoff.next_delay(), &shutdown).await {
            return Ok(());
        }
    }
}
