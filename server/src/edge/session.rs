//! `flotte.v1.AgentSession`: the one long-lived stream per agent.
//!
//! On connect the agent says hello (inventory), the server records it once,
//! registers the session and sends the whole desired state. Afterwards reports
//! only touch the registry; certificate renewals are answered on the stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotte_proto::v1::agent_message::Kind as AgentKind;
use flotte_proto::v1::agent_session_server::AgentSession;
use flotte_proto::v1::server_message::Kind as ServerKind;
use flotte_proto::v1::{
    AgentMessage, CertificateIssued, DesiredImage, DesiredState as ProtoDesiredState,
    FetchImageRequest, ForensicsChunk, Hello, ImageChunk, ImageRef, ServerMessage, SessionRefused,
    UploadForensicsResponse,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::domain::desired_state::DesiredState;
use crate::edge::auth::{require_machine, require_not_revoked, Caller};
use crate::live::feed::Change;
use crate::live::registry::{SessionEntry, SessionMessage, SessionSender, SESSION_QUEUE_DEPTH};
use crate::services::enrollment::Enroller;
use crate::services::renewal::{min_renewal_interval, RenewalError};
use crate::store::{Inventory, MachineRecord};
use crate::ServerState;

const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct SessionApi {
    state: Arc<ServerState>,
}

impl SessionApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        SessionApi { state }
    }
}

/// Bytes per image chunk sent to agents.
const IMAGE_CHUNK_BYTES: usize = 256 * 1024;

/// The wire form of a desired state.
pub fn desired_state_to_proto(desired: &DesiredState) -> ProtoDesiredState {
    ProtoDesiredState {
        version: desired.version,
        labels: desired.labels.clone().into_iter().collect(),
        zone: desired.zone.clone(),
        report_interval_seconds: u32::try_from(desired.report_interval.as_secs())
            .unwrap_or(u32::MAX),
        image: desired.image.as_ref().map(|desired| DesiredImage {
            image: Some(ImageRef {
                name: desired.image.name.clone(),
                version: desired.image.version.clone(),
                digest: desired.image.digest.clone(),
            }),
            size: desired.image.size,
            manifest_json: desired.image.manifest_json.clone(),
            signature: desired.image.signature.clone(),
            rollback: desired.rollback,
            rollout_id: desired
                .rollout_id
                .map(|rollout| rollout.to_string())
                .unwrap_or_default(),
        }),
        quarantine: desired
            .quarantine
            .as_ref()
            .map(crate::edge::repair::quarantine_to_proto),
        access: desired
            .access
            .as_ref()
            .map(crate::edge::access::policy_to_proto),
    }
}

/// The wire form of what the server says on a session.
fn session_message_to_proto(message: SessionMessage) -> Result<ServerMessage, Status> {
    let kind = match message {
        SessionMessage::DesiredState(desired) => {
            ServerKind::DesiredState(desired_state_to_proto(&desired))
        }
        SessionMessage::AccessPolicy(policy) => {
            ServerKind::AccessPolicy(crate::edge::access::policy_to_proto(&policy))
        }
        SessionMessage::CertificateIssued {
            certificate_pem,
            not_after,
        } => ServerKind::CertificateIssued(CertificateIssued {
            certificate_pem,
            not_after,
        }),
        SessionMessage::Refused(reason) => ServerKind::Refused(SessionRefused { reason }),
        SessionMessage::Ended(reason) => return Err(Status::aborted(reason)),
        SessionMessage::ImageCommand {
            request_id,
            restore,
        } => ServerKind::ImageCommand(crate::edge::integrity::image_command_to_proto(
            request_id, restore,
        )),
    };
    Ok(ServerMessage { kind: Some(kind) })
}

fn inventory_from_hello(hello: &Hello) -> Inventory {
    let inventory = hello.inventory.clone().unwrap_or_default();
    Inventory {
        hostname: inventory.hostname,
        os: inventory.os,
        kernel: inventory.kernel,
        arch: inventory.arch,
        agent_version: inventory.agent_version,
        boot_time: inventory.boot_time,
    }
}

/// The machine calling an agent RPC: a machine certificate, an identity not
/// denied (the handshake refuses one too; this also covers a connection
/// opened just before the denial, cut after a short grace), enrolled here
/// and not decommissioned.
async fn admit_machine<T>(
    state: &ServerState,
    request: &Request<T>,
) -> Result<(MachineRecord, Caller), Status> {
    let (machine_id, caller) = require_machine(request)?;
    require_not_revoked(&caller, &state.revocations)?;
    let machine = state.store.machine(machine_id).await?.ok_or_else(|| {
        Status::permission_denied(format!(
            "machine {machine_id} is not enrolled on this server"
        ))
    })?;
    if machine.retired_at.is_some() {
        return Err(Status::permission_denied(format!(
            "machine {machine_id} was decommissioned"
        )));
    }
    Ok((machine, caller))
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;
type ImageChunkStream = Pin<Box<dyn Stream<Item = Result<ImageChunk, Status>> + Send>>;

#[tonic::async_trait]
impl AgentSession for SessionApi {
    type SessionStream = SessionStream;
    type FetchImageStream = ImageChunkStream;

    /// Streams the blob of the machine's desired image from an offset; any
    /// other blob is refused (a machine reads only what it was told to run).
    async fn fetch_image(
        &self,
        request: Request<FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        let (machine, _caller) = admit_machine(&self.state, &request).await?;
        let FetchImageRequest { digest, offset } = request.into_inner();
        if machine
            .desired_image
            .as_ref()
            .map(|image| image.digest.as_str())
            != Some(digest.as_str())
        {
            return Err(Status::permission_denied(format!(
                "image {digest} is not this machine's desired image"
            )));
        }
        let blobs = Arc::clone(&self.state.blobs);
        let size = blobs
            .size(&digest)
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .ok_or_else(|| Status::not_found(format!("image blob {digest} is missing")))?;
        if offset > size {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the end ({size} bytes)"
            )));
        }
        let (sender, receiver) = mpsc::channel(4);
        let bytes_served = self.state.metrics.image_bytes_served.clone();
        tokio::spawn(async move {
            let mut position = offset;
            while position < size {
                let data = match blobs.read_at(&digest, position, IMAGE_CHUNK_BYTES).await {
                    Ok(data) if !data.is_empty() => data,
                    Ok(_) => {
                        let _ = sender
                            .send(Err(Status::internal(format!(
                                "image blob {digest} ends before its {size} bytes"
                            ))))
                            .await;
                        return;
                    }
                    Err(error) => {
                        let _ = sender.send(Err(Status::internal(error.to_string()))).await;
                        return;
                    }
                };
                let read = data.len() as u64;
                let chunk = ImageChunk {
                    offset: position,
                    data,
                };
                position += read;
                if sender.send(Ok(chunk)).await.is_err() {
                    return;
                }
                bytes_served.inc_by(read);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn upload_forensics(
        &self,
        request: Request<Streaming<ForensicsChunk>>,
    ) -> Result<Response<UploadForensicsResponse>, Status> {
        crate::edge::repair::upload_forensics(&self.state, request).await
    }

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let state = Arc::clone(&self.state);
        let (machine, caller) = admit_machine(&state, &request).await?;
        let machine_id = machine.id;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                kind: Some(AgentKind::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be hello",
                ))
            }
            Ok(Ok(None)) => return Err(Status::cancelled("stream closed before hello")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no hello within 30 s")),
        };
        crate::edge::enrollment::require_valid_hostname(
            hello
                .inventory
                .as_ref()
                .map_or("", |inventory| &inventory.hostname),
        )?;
        let now = state.clock.now_unix();
        let inventory = inventory_from_hello(&hello);
        state
            .store
            .record_inventory(machine_id, &inventory, now)
            .await?;
        state.health.upsert(
            &MachineRecord {
                inventory,
                ..machine.clone()
            },
            now,
        );

        let (sender, receiver) = mpsc::channel(SESSION_QUEUE_DEPTH);
        let cancel = CancellationToken::new();
        let session_id = state.registry.allocate_session_id();
        state.registry.register(
            machine_id,
            SessionEntry {
                session_id,
                sender: sender.clone(),
                cancel: cancel.clone(),
                remote_address: caller.peer.remote_address,
                connected_at: now,
                last_seen: now,
                applied_desired_version: hello.applied_desired_version,
            },
        );
        state.replicas.session_opened(machine_id, now);
        tracing::info!(machine = %machine_id, remote = %caller.peer.remote_address, hostname = %hello.inventory.as_ref().map(|i| i.hostname.as_str()).unwrap_or(""), "agent session opened");
        // Registered first, read second: a change committed before this read
        // is in the state sent now, and one committed after it is pushed
        // through the registry. Reading before registering could miss both.
        let fresh = state.store.machine(machine_id).await?.unwrap_or(machine);
        let desired = state.publisher.desired_state_of(&fresh).await?;
        sender
            .send(SessionMessage::DesiredState(Box::new(desired)))
            .await
            .map_err(|_| Status::cancelled("session closed"))?;

        let session_key = match &caller.peer.certificate {
            crate::edge::tls::PeerCertificate::Verified { public_key_raw, .. } => {
                public_key_raw.clone()
            }
            _ => Vec::new(),
        };
        tokio::spawn(serve_session(
            state,
            machine_id,
            session_id,
            inbound,
            sender,
            cancel,
            session_key,
        ));
        Ok(Response::new(Box::pin(
            ReceiverStream::new(receiver).map(session_message_to_proto),
        )))
    }
}

/// Reads the agent's messages until the stream ends or the session is cancelled.
async fn serve_session(
    state: Arc<ServerState>,
    machine_id: Uuid,
    session_id: u64,
    mut inbound: Streaming<AgentMessage>,
    sender: SessionSender,
    cancel: CancellationToken,
    session_key: Vec<u8>,
) {
    let renewal_spacing = min_renewal_interval(state.config.machine_certificate_ttl);
    let mut last_renewal: Option<tokio::time::Instant> = None;
    // One verification a second at most reaches the store (each is a write).
    let mut last_verification_kept: Option<tokio::time::Instant> = None;
    let end_reason = loop {
        let message = tokio::select! {
            () = cancel.cancelled() => {
                let _ = sender.try_send(SessionMessage::Ended("session closed by the server (replaced by a newer session, or server shutdown)".to_owned()));
                break "closed by the server";
            }
            message = inbound.message() => message,
        };
        let message = match message {
            Ok(Some(message)) => message,
            Ok(None) => break "closed by agent",
            Err(status) => {
                tracing::debug!(machine = %machine_id, %status, "session stream error");
                break "stream error";
            }
        };
        let now = state.clock.now_unix();
        state.registry.touch(machine_id, now);
        match message.kind {
            Some(AgentKind::Report(report)) => {
                state.metrics.agent_reports.inc();
                let changed_image = state.health.observe_report(
                    machine_id,
                    crate::edge::health_report::health_report_from_proto(report),
                    now,
                );
                state.rollouts.machine_changed(machine_id);
                if let Some(image) = changed_image {
                    state
                        .feed
                        .announce(Change::Image {
                            machine: machine_id,
                            image: Box::new(image),
                        })
                        .await;
                }
            }
            None => {}
            Some(AgentKind::Hello(_)) => {
                tracing::debug!(machine = %machine_id, "ignoring repeated hello");
            }
            Some(AgentKind::Ack(ack)) => {
                state
                    .registry
                    .record_applied_version(machine_id, ack.version);
            }
            Some(AgentKind::RenewCertificate(renewal)) => {
                let elapsed = last_renewal.map(|at| at.elapsed());
                if elapsed.is_some_and(|elapsed| elapsed < renewal_spacing) {
                    tracing::warn!(machine = %machine_id, error = %RenewalError::TooSoon(renewal_spacing), "certificate renewal refused");
                    continue;
                }
                last_renewal = Some(tokio::time::Instant::now());
                renew_certificate(&state, machine_id, &renewal.csr_pem, &session_key, &sender)
                    .await;
            }
            Some(AgentKind::AccessState(access)) => {
                crate::edge::access::record_access_state(&state, machine_id, access, now);
            }
            Some(AgentKind::ImageVerification(verification)) => {
                // Each is a store write: an agent sending them faster than
                // the spacing waits (its own session only); none is lost.
                if let Some(kept) = last_verification_kept {
                    tokio::time::sleep_until(
                        kept + crate::edge::integrity::MIN_VERIFICATION_SPACING,
                    )
                    .await;
                }
                last_verification_kept = Some(tokio::time::Instant::now());
                crate::edge::integrity::record_verification(&state, machine_id, verification, now)
                    .await;
            }
        }
    };
    if state.registry.unregister(machine_id, session_id).is_some() {
        state.replicas.session_closed(machine_id);
        let last_seen = state.clock.now_unix();
        if let Err(error) = state
            .store
            .record_last_seen(&[(machine_id, last_seen)])
            .await
        {
            tracing::warn!(machine = %machine_id, %error, "cannot record last-seen at disconnect");
        }
    }
    tracing::info!(machine = %machine_id, reason = end_reason, "agent session ended");
}

async fn renew_certificate(
    state: &ServerState,
    machine_id: Uuid,
    csr_pem: &str,
    session_key: &[u8],
    sender: &SessionSender,
) {
    // A refused or unrecorded renewal is logged, not fatal: the session
    // goes on and the agent asks again later.
    match Enroller::of(state)
        .renew(machine_id, csr_pem, session_key)
        .await
    {
        Ok(renewed) => {
            let _ = sender
                .send(SessionMessage::CertificateIssued {
                    certificate_pem: renewed.certificate_pem,
                    not_after: renewed.not_after,
                })
                .await;
        }
        Err(
            error @ (RenewalError::Refused(_) | RenewalError::OtherKey | RenewalError::TooSoon(_)),
        ) => {
            tracing::warn!(machine = %machine_id, %error, "certificate renewal refused");
        }
        Err(RenewalError::Store(error)) => {
            tracing::error!(machine = %machine_id, %error, "cannot record renewed certificate");
        }
    }
}
