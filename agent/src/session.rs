//! One agent ↔ server session: hello, then desired state in, reports and acks
//! out, certificate renewal before expiry — until the stream ends or shutdown.
//!
//! Reconnecting, backoff and server rotation belong to the caller (`run`);
//! this module handles exactly one stream so that the load generator can
//! drive thousands of them from one process. What a session needs of the
//! image manager and of access enforcement are traits ([`ImageManager`],
//! [`AccessHandler`]): the load generator brings its own stand-ins, and no
//! simulation lives in the agent.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flotte_proto::transport::{
    channel_with_diagnostics, client_config, explain_status_with, TlsDiagnostics,
};
use flotte_proto::v1::agent_message::Kind as AgentKind;
use flotte_proto::v1::agent_session_client::AgentSessionClient;
use flotte_proto::v1::server_message::Kind as ServerKind;
use flotte_proto::v1::{
    AccessPolicy, AccessState, AgentMessage, CertificateRenewal, DesiredImage, DesiredState,
    DesiredStateAck, Hello, ImageStatus, Report,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::clock::unix_now;
use crate::health::{HealthReceiver, HealthSnapshot};
use crate::identity::{csr_for, MachineIdentity};
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
    /// Decommissioned: told so on the session (`SessionRefused`, which the
    /// server sends for nothing else), or the machine's certificate is
    /// refused as revoked at the handshake. Final: the agent stops.
    #[error("this machine was decommissioned: {0}")]
    Decommissioned(String),
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

    /// True when the machine was decommissioned: no retry will ever succeed
    /// (a retired machine comes back only by enrolling anew).
    pub fn is_decommissioned(&self) -> bool {
        matches!(self, SessionError::Decommissioned(_))
    }
}

/// How a session ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    Shutdown,
    ClosedByServer(String),
}

/// What a session needs of the machine's image manager: it hands over each
/// desired image and reports the status. The real one is
/// `image::swap::ImageHandle`; the load generator brings its own.
pub trait ImageManager: Send + Sync + std::fmt::Debug {
    /// Hands over the desired image of desired-state `version`.
    fn desire(&self, version: u64, image: DesiredImage);
    /// The manager's status, which changes as a swap progresses.
    fn status(&self) -> watch::Receiver<ImageStatus>;
}

/// What a session needs of SSH access enforcement. The real one is
/// `access::AccessEnforcer`; the load generator's only acknowledges.
pub trait AccessHandler: Send + Sync + std::fmt::Debug {
    /// Applies `policy` if it is newer; the acknowledgement to send, if any
    /// (none when it could not be applied: the server keeps listing this
    /// machine as pending, which is the truth).
    fn apply(&self, policy: &AccessPolicy) -> Option<AccessState>;
    /// The session was established (`true`) or ended (`false`).
    fn set_contact(&self, _connected: bool) {}
    /// A report went out: a moment to look at the disk again (elsewhere:
    /// the session never waits on a user's files).
    fn on_report(&self) {}
    /// Changes when [`AccessHandler::news`] may have something to send.
    fn news_signal(&self) -> Option<watch::Receiver<u64>> {
        None
    }
    /// What changed since the last state sent, if anything (drift).
    fn news(&self) -> Option<AccessState> {
        None
    }
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
    /// The image manager (none: desired images are ignored).
    pub images: Option<Arc<dyn ImageManager>>,
    /// Told about renewed certificates (image downloads use the identity too).
    pub identity_watch: Option<watch::Sender<MachineIdentity>>,
    /// The quarantine manager (absent for simulated agents).
    pub quarantine: Option<crate::repair::QuarantineHandle>,
    /// SSH access for people (none: no `[access]`, so policies are ignored
    /// and not acknowledged).
    pub access: Option<Arc<dyn AccessHandler>>,
    /// The image verifier (none: verification commands are ignored and
    /// reports carry no drift).
    pub integrity: Option<crate::image::integrity::IntegrityHandle>,
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

/// Why the session loop stopped: an end (not an error) or a failure.
enum Stop {
    End(SessionEnd),
    Failed(SessionError),
}

impl From<SessionError> for Stop {
    fn from(error: SessionError) -> Self {
        Stop::Failed(error)
    }
}

impl From<crate::identity::IdentityError> for Stop {
    fn from(error: crate::identity::IdentityError) -> Self {
        Stop::Failed(error.into())
    }
}

/// The session's outbound queue.
struct Outbound(mpsc::Sender<AgentMessage>);

impl Outbound {
    /// Queues `kind`; a closed stream ends the session.
    async fn send(&self, kind: AgentKind) -> Result<(), Stop> {
        self.0
            .send(message(kind))
            .await
            .map_err(|_| Stop::End(SessionEnd::ClosedByServer("outbound stream closed".into())))
    }
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
        image_drift_files: 0,
    }
}

/// Differences the latest verification found in the image running now (a
/// result about another image, from before a swap, counts for nothing).
fn drift_of_running_image(
    verification: Option<&crate::image::integrity::Verification>,
    image: Option<&ImageStatus>,
) -> u64 {
    let running = image.and_then(|image| image.current.as_ref());
    match (verification, running) {
        (Some(verification), Some(running)) if verification.image.digest == running.digest => {
            verification.drift_files()
        }
        _ => 0,
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
    let outbound = Outbound(outbound);
    let mut inventory = crate::inventory::collect(
        state.hostname.as_deref(),
        &state.applied.labels,
        &state.applied.zone,
    );
    let mut image_status = state.images.as_ref().map(|images| images.status());
    inventory.image = image_status.as_ref().map(|status| status.borrow().clone());
    // The channel is fresh and larger than one message: this cannot block.
    let _ = outbound
        .send(AgentKind::Hello(Hello {
            inventory: Some(inventory),
            applied_desired_version: state.applied.version,
        }))
        .await;
    let mut inbound = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        response = client.session(ReceiverStream::new(outbound_receiver)) => match response {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(classify(address, &status, &diagnostics, true)),
        },
    };

    let mut report_interval = state.report_interval();
    // The first report goes out at once so the server learns health on connect.
    let mut next_report = Instant::now();
    let mut renew_at = instant_at(state.identity.renew_at(SystemTime::now()));
    let mut sequence = 0u64;
    let mut established = false;
    let mut health_open = true;
    let mut image_open = image_status.is_some();
    let access = state.access.clone();
    let mut access_news = access.as_ref().and_then(|access| access.news_signal());
    let mut access_news_open = access_news.is_some();
    let mut reported_verdict_version = u64::MAX;
    let mut verifications = state
        .integrity
        .as_ref()
        .map(|integrity| integrity.results());
    let mut verifications_open = verifications.is_some();
    // The latest result goes out on every connect: the server may have
    // restarted, and a drifted machine must stay degraded there.
    if let Some(latest) = verifications
        .as_mut()
        .and_then(|results| results.borrow_and_update().clone())
    {
        let _ = outbound
            .send(AgentKind::ImageVerification(latest.to_proto()))
            .await;
    }
    // The server may queue a push built from a newer record ahead of the
    // whole state it reads on connect (both race after registration), so
    // within one session an older desired state is stale and dropped. Not
    // across sessions: a server restored from an older backup must still be
    // obeyed.
    let mut newest_desired_in_session = 0u64;
    let stopped: Result<Infallible, Stop> = async {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Err(Stop::End(SessionEnd::Shutdown)),
                received = inbound.message() => {
                    let received = match received {
                        Ok(Some(received)) => received,
                        Ok(None) => return Err(Stop::End(SessionEnd::ClosedByServer("stream ended".into()))),
                        Err(status) => return Err(classify(address, &status, &diagnostics, !established).into()),
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
                            if let (Some(access), Some(policy)) = (&access, &desired.access) {
                                if let Some(acknowledgement) = access.apply(policy) {
                                    outbound.send(AgentKind::AccessState(acknowledgement)).await?;
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
                            outbound.send(AgentKind::Ack(DesiredStateAck { version: desired.version })).await?;
                            if !established {
                                established = true;
                                if let Some(access) = &access {
                                    access.set_contact(true);
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
                            if let Some(acknowledgement) = access.as_ref().and_then(|access| access.apply(&policy)) {
                                outbound.send(AgentKind::AccessState(acknowledgement)).await?;
                            }
                        }
                        Some(ServerKind::ImageCommand(command)) => {
                            let queued = state.integrity.as_ref().is_some_and(|integrity| integrity.command(&command));
                            if !queued {
                                tracing::warn!(request = %command.request_id, "image command not queued (no verifier, unknown action, or too many waiting)");
                            }
                        }
                        Some(ServerKind::Refused(refused)) => return Err(SessionError::Decommissioned(refused.reason).into()),
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
                    let image = image_status.as_ref().map(|status| status.borrow().clone());
                    let drift = drift_of_running_image(
                        verifications.as_ref().and_then(|results| results.borrow().clone()).as_deref(),
                        image.as_ref(),
                    );
                    let mut report = report_from(&snapshot, image, sequence);
                    report.image_drift_files = drift;
                    if let Err(stop) = outbound.send(AgentKind::Report(report)).await {
                        state.metrics.record_report_failure();
                        return Err(stop);
                    }
                    stats.reports_sent += 1;
                    next_report = Instant::now() + report_interval;
                    if let Some(access) = &access {
                        access.on_report();
                    }
                }
                changed = changed_if_any(&mut verifications), if verifications_open => {
                    if changed.is_err() {
                        verifications_open = false;
                        continue;
                    }
                    let latest = verifications.as_mut().and_then(|results| results.borrow_and_update().clone());
                    if let Some(latest) = latest {
                        outbound.send(AgentKind::ImageVerification(latest.to_proto())).await?;
                    }
                    // The machine's state follows the drift at once.
                    next_report = Instant::now();
                }
                changed = changed_if_any(&mut access_news), if access_news_open => {
                    if changed.is_err() {
                        access_news_open = false;
                        continue;
                    }
                    // Drift (a hand-added key) is sent when a scan finds it.
                    if let Some(news) = access.as_ref().and_then(|access| access.news()) {
                        outbound.send(AgentKind::AccessState(news)).await?;
                    }
                }
                () = tokio::time::sleep_until(renew_at) => {
                    let csr_pem = csr_for(&state.identity.key_pem)?;
                    outbound.send(AgentKind::RenewCertificate(CertificateRenewal { csr_pem })).await?;
                    renew_at = Instant::now() + RENEWAL_RETRY;
                }
            }
        }
    }
    .await;
    match stopped {
        Err(Stop::End(end)) => Ok(end),
        Err(Stop::Failed(error)) => Err(error),
        Ok(never) => match never {},
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
        // A machine certificate is revoked only by decommissioning.
        _ if diagnostics.certificate_revoked() => {
            SessionError::Decommissioned(explain_status_with(status, diagnostics))
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
