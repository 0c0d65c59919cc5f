//! One agent ↔ server session: hello, then desired state in, reports and acks
//! out, certificate renewal before expiry — until the stream ends or shutdown.
//!
//! Reconnecting, backoff and server rotation belong to the caller (`run`);
//! this module handles exactly one stream so that the load generator can
//! drive thousands of them from one process.

use std::time::{Duration, SystemTime};

use flotte_proto::transport::{
    channel_with_diagnostics, client_config, explain_status_with, TlsDiagnostics,
};
use flotte_proto::v1::agent_message::Kind as AgentKind;
use flotte_proto::v1::agent_session_client::AgentSessionClient;
use flotte_proto::v1::server_message::Kind as ServerKind;
use flotte_proto::v1::{
    AccessPolicy, AccessState, AgentMessage, CertificateRenewal, DesiredState, DesiredStateAck,
    Hello, Report,
};

use flotte_proto::v1::ImageStatus;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::access::{local_policy, unix_now as access_now, AccessEnforcer};
use crate::health::{HealthReceiver, HealthSnapshot};
use crate::identity::{csr_for, MachineIdentity};
use crate::image::swap::ImageHandle;
use crate::metrics::AgentMetrics;
use crate::state::{AppliedState, Persistence};

/// If a renewal request got no answer, ask again after this long.
const RENEWAL_RETRY: Duration = Duration::from_secs(10);
const OUTBOUND_QUEUE_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot open a session with {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("session with {address} failed: {reason}")]
    Stream { address: String, reason: String },
    #[error("the server refused this machine: {0}")]
    Refused(String),
    #[error(transparent)]
    Transport(#[from] flotte_proto::transport::TransportError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

impl SessionError {
    /// True when the server (not the network) said no: retrying will not help
    /// until an operator acts, so it is logged louder.
    pub fn is_refusal(&self) -> bool {
        matches!(self, SessionError::Refused(_))
    }
}

/// How a session ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    Shutdown,
    ClosedByServer(String),
}

/// What one machine carries from session to session.
#[derive(Debug, Clone)]
pub struct AgentState {
    pub identity: MachineIdentity,
    pub applied: AppliedState,
    pub hostname: Option<String>,
    /// Used until the server sends a report interval.
    pub default_report_interval: Duration,
    /// Latest health checks and system metrics (see `health`).
    pub health: HealthReceiver,
    pub metrics: AgentMetrics,
    /// The image manager (absent for simulated agents).
    pub images: Option<ImageHandle>,
    /// Told about renewed certificates (image downloads use the identity too).
    pub identity_watch: Option<watch::Sender<MachineIdentity>>,
    /// The quarantine manager (absent for simulated agents).
    pub quarantine: Option<crate::repair::QuarantineHandle>,
    /// SSH access for people (see `access`).
    pub access: AccessMode,
}

/// How this session handles access policies.
#[derive(Debug, Clone)]
pub enum AccessMode {
    /// No `[access]` configured: policies are ignored and not acknowledged.
    Unmanaged,
    /// Policies are enforced on this machine, then acknowledged.
    Enforced(std::sync::Arc<AccessEnforcer>),
    /// Load generator only: the version is acknowledged as soon as it is
    /// received, nothing is written anywhere; the log (if any) records when.
    SimulatedAck(Option<std::sync::Arc<SimulatedAckLog>>),
}

/// When a simulated agent acknowledged each access policy version (first
/// time only), for the load generator's propagation figures.
#[derive(Debug, Default)]
pub struct SimulatedAckLog {
    acks: std::sync::Mutex<Vec<(u64, std::time::Instant)>>,
}

impl SimulatedAckLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, std::time::Instant)>> {
        // Every write is one push: a poisoned lock still holds whole entries.
        self.acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn record(&self, version: u64) {
        let mut acks = self.lock();
        if !acks.iter().any(|(known, _)| *known == version) {
            acks.push((version, std::time::Instant::now()));
        }
    }

    /// When a version at least `version` was first acknowledged.
    pub fn first_ack_of_at_least(&self, version: u64) -> Option<std::time::Instant> {
        self.lock()
            .iter()
            .filter(|(known, _)| *known >= version)
            .map(|(_, at)| *at)
            .min()
    }
}

impl AgentState {
    fn image_status(&self) -> Option<ImageStatus> {
        self.images
            .as_ref()
            .map(|images| images.status.borrow().clone())
    }
}

impl AgentState {
    fn report_interval(&self) -> Duration {
        match self.applied.report_interval_seconds {
            0 => self.default_report_interval,
            seconds => Duration::from_secs(u64::from(seconds)),
        }
    }
}

/// Counters a caller can read after (or during) a session; used for logs and
/// by the load generator.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionStats {
    pub reports_sent: u64,
    pub renewals: u64,
    pub desired_states_applied: u64,
}

fn message(kind: AgentKind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |duration| {
            i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
        })
}

/// Tokio instant corresponding to a wall-clock time (now if in the past).
fn instant_at(time: SystemTime) -> Instant {
    let delay = time
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + delay
}

/// A report carrying the latest health snapshot and image status.
pub fn report_from(snapshot: &HealthSnapshot, image: Option<ImageStatus>, sequence: u64) -> Report {
    Report {
        sent_at: unix_now(),
        uptime_seconds: crate::inventory::uptime_seconds(),
        sequence,
        checks: snapshot.checks.values().cloned().collect(),
        metrics: Some(snapshot.metrics.clone()),
        metric_breaches: snapshot.metric_breaches.clone(),
        image,
    }
}

/// The next change of an optional watch; never, when there is none.
async fn changed_if_any<T>(
    receiver: &mut Option<watch::Receiver<T>>,
) -> Result<(), watch::error::RecvError> {
    match receiver {
        Some(receiver) => receiver.changed().await,
        None => std::future::pending().await,
    }
}

fn apply_desired(state: &mut AgentState, desired: &DesiredState) -> bool {
    let applied = AppliedState {
        version: desired.version,
        labels: desired.labels.clone().into_iter().collect(),
        zone: desired.zone.clone(),
        report_interval_seconds: desired.report_interval_seconds,
    };
    // Re-sent desired state is harmless: only a difference is applied.
    if applied == state.applied {
        return false;
    }
    state.applied = applied;
    true
}

/// Applies an access policy (before anything else in a desired state) and
/// returns the acknowledgement to send, if any.
fn apply_access(access: &AccessMode, policy: &AccessPolicy) -> Option<AccessState> {
    match access {
        AccessMode::Unmanaged => None,
        AccessMode::SimulatedAck(log) => {
            if let Some(log) = log {
                log.record(policy.version);
            }
            Some(AccessState {
                applied_version: policy.version,
                ..AccessState::default()
            })
        }
        AccessMode::Enforced(enforcer) => {
            match enforcer.receive(local_policy(policy), access_now()) {
                Ok(true) => tracing::info!(version = policy.version, "access policy applied"),
                Ok(false) => {}
                Err(error) => {
                    // Not acknowledged: the server keeps listing this
                    // machine as pending, which is the truth.
                    tracing::error!(%error, version = policy.version, "cannot apply the access policy");
                    return None;
                }
            }
            enforcer.state_to_report(true)
        }
    }
}

/// Runs one session with `address` until it ends. `on_established` is called
/// once the server has answered the hello with the desired state.
pub async fn run_session(
    address: &str,
    state: &mut AgentState,
    persistence: &dyn Persistence,
    stats: &mut SessionStats,
    shutdown: &CancellationToken,
    on_established: &mut (dyn FnMut() + Send),
) -> Result<SessionEnd, SessionError> {
    let tls = client_config(
        &state.identity.ca_pem,
        Some((&state.identity.certificate_pem, &state.identity.key_pem)),
    )?;
    let (channel, diagnostics) = channel_with_diagnostics(address, std::sync::Arc::new(tls))?;
    let mut client = AgentSessionClient::new(channel);
    let (outbound, outbound_receiver) = mpsc::channel(OUTBOUND_QUEUE_DEPTH);
    let mut inventory = crate::inventory::collect(
        state.hostname.as_deref(),
        &state.applied.labels,
        &state.applied.zone,
    );
    inventory.image = state.image_status();
    // The channel is fresh and larger than one message: this cannot block.
    let _ = outbound
        .send(message(AgentKind::Hello(Hello {
            inventory: Some(inventory),
            applied_desired_version: state.applied.version,
        })))
        .await;
    let mut inbound = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        response = client.session(ReceiverStream::new(outbound_receiver)) => match response {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(classify(address, &status, &diagnostics, true)),
        },
    };

    let send = |kind: AgentKind| {
        let outbound = outbound.clone();
        async move { outbound.send(message(kind)).await.is_ok() }
    };
    let mut report_interval = state.report_interval();
    // The first report goes out at once so the server learns health on connect.
    let mut next_report = Instant::now();
    let mut renew_at = instant_at(state.identity.renew_at(SystemTime::now()));
    let mut sequence = 0u64;
    let mut established = false;
    let mut health_open = true;
    let mut image_status = state.images.as_ref().map(|images| images.status.clone());
    let mut image_open = image_status.is_some();
    let mut access_scans = match &state.access {
        AccessMode::Enforced(enforcer) => Some(enforcer.scans_done()),
        _ => None,
    };
    let mut access_scans_open = access_scans.is_some();
    let mut reported_verdict_version = u64::MAX;
    // The server may queue a push built from a newer record ahead of the
    // whole state it reads on connect (both race after registration), so
    // within one session an older desired state is stale and dropped. Not
    // across sessions: a server restored from an older backup must still be
    // obeyed.
    let mut newest_desired_in_session = 0u64;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            received = inbound.message() => {
                let received = match received {
                    Ok(Some(received)) => received,
                    Ok(None) => return Ok(SessionEnd::ClosedByServer("stream ended".into())),
                    Err(status) => return Err(classify(address, &status, &diagnostics, !established)),
                };
                match received.kind {
                    Some(ServerKind::DesiredState(desired)) => {
                        if desired.version < newest_desired_in_session {
                            tracing::info!(version = desired.version, newest = newest_desired_in_session, "ignoring an older desired state that arrived after a newer one");
                            continue;
                        }
                        newest_desired_in_session = desired.version;
                        // Access first: a machine back from a disconnection
                        // must drop revoked keys before it starts an image swap.
                        if let Some(access) = desired.access.as_ref().and_then(|policy| apply_access(&state.access, policy)) {
                            if !send(AgentKind::AccessState(access)).await {
                                return Ok(SessionEnd::ClosedByServer("outbound stream closed".into()));
                            }
                        }
                        if let (Some(images), Some(image)) = (&state.images, &desired.image) {
                            images.desire(desired.version, image.clone());
                        }
                        if let Some(quarantine) = &state.quarantine {
                            quarantine.desire(desired.quarantine.clone());
                        }
                        if apply_desired(state, &desired) {
                            if let Err(error) = persistence.save_applied(&state.applied) {
                                tracing::error!(%error, "cannot persist applied desired state");
                            }
                            stats.desired_states_applied += 1;
                            tracing::info!(version = desired.version, zone = %desired.zone, "desired state applied");
                        }
                        let interval = state.report_interval();
                        if interval != report_interval {
                            report_interval = interval;
                            next_report = Instant::now() + report_interval;
                        }
                        if !send(AgentKind::Ack(DesiredStateAck { version: desired.version })).await {
                            return Ok(SessionEnd::ClosedByServer("outbound stream closed".into()));
                        }
                        if !established {
                            established = true;
                            if let AccessMode::Enforced(enforcer) = &state.access {
                                enforcer.set_contact(true, access_now());
                            }
                            on_established();
                        }
                    }
                    Some(ServerKind::CertificateIssued(issued)) => {
                        let renewed = state.identity.with_certificate(issued.certificate_pem)?;
                        if let Err(error) = persistence.save_certificate(&renewed) {
                            tracing::error!(%error, "cannot persist renewed certificate; keeping the old one");
                        } else {
                            if let Some(identity_watch) = &state.identity_watch {
                                identity_watch.send_replace(renewed.clone());
                            }
                            state.identity = renewed;
                            stats.renewals += 1;
                            renew_at = instant_at(state.identity.renew_at(SystemTime::now()));
                            tracing::info!(not_after = issued.not_after, "certificate renewed");
                        }
                    }
                    Some(ServerKind::AccessPolicy(policy)) => {
                        if let Some(access) = apply_access(&state.access, &policy) {
                            if !send(AgentKind::AccessState(access)).await {
                                return Ok(SessionEnd::ClosedByServer("outbound stream closed".into()));
                            }
                        }
                    }
                    Some(ServerKind::Refused(refused)) => return Err(SessionError::Refused(refused.reason)),
                    None => {}
                }
            }
            changed = state.health.changed(), if health_open => {
                if changed.is_err() {
                    // The monitor is gone (or never existed): report on the timer only.
                    health_open = false;
                    continue;
                }
                let verdict_version = state.health.borrow().verdict_version;
                if verdict_version == reported_verdict_version {
                    continue;
                }
                // A verdict changed: report now rather than at the next tick.
                next_report = Instant::now();
            }
            changed = changed_if_any(&mut image_status), if image_open => {
                if changed.is_err() {
                    image_open = false;
                    continue;
                }
                // Swap progress is reported as it happens.
                next_report = Instant::now();
            }
            () = tokio::time::sleep_until(next_report) => {
                sequence += 1;
                let snapshot = std::sync::Arc::clone(&state.health.borrow());
                reported_verdict_version = snapshot.verdict_version;
                let image = state.image_status();
                if !send(AgentKind::Report(report_from(&snapshot, image, sequence))).await {
                    state.metrics.record_report_failure();
                    return Ok(SessionEnd::ClosedByServer("outbound stream closed".into()));
                }
                stats.reports_sent += 1;
                next_report = Instant::now() + report_interval;
                if let AccessMode::Enforced(enforcer) = &state.access {
                    enforcer.set_contact(true, access_now());
                    // Drift (a hand-added key) is reported when a scan
                    // finds it; the scan runs elsewhere (see below).
                    enforcer.request_scan();
                }
            }
            changed = changed_if_any(&mut access_scans), if access_scans_open => {
                if changed.is_err() {
                    access_scans_open = false;
                    continue;
                }
                if let AccessMode::Enforced(enforcer) = &state.access {
                    if let Some(access) = enforcer.state_to_report(false) {
                        if !send(AgentKind::AccessState(access)).await {
                            return Ok(SessionEnd::ClosedByServer("outbound stream closed".into()));
                        }
                    }
                }
            }
            () = tokio::time::sleep_until(renew_at) => {
                let csr_pem = csr_for(&state.identity.key_pem)?;
                if !send(AgentKind::RenewCertificate(CertificateRenewal { csr_pem })).await {
                    return Ok(SessionEnd::ClosedByServer("outbound stream closed".into()));
                }
                renew_at = Instant::now() + RENEWAL_RETRY;
            }
        }
    }
}

fn classify(
    address: &str,
    status: &tonic::Status,
    diagnostics: &TlsDiagnostics,
    connecting: bool,
) -> SessionError {
    match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            SessionError::Refused(status.message().to_owned())
        }
        _ if connecting => SessionError::Connect {
            address: address.to_owned(),
            reason: explain_status_with(status, diagnostics),
        },
        _ => SessionError::Stream {
            address: address.to_owned(),
            reason: explain_status_with(status, diagnostics),
        },
    }
}
