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
    AgentMessage, CertificateIssued, DesiredImage, DesiredState, FetchImageRequest, ForensicsChunk,
    Hello, ImageChunk, ImageRef, ServerMessage, UploadForensicsResponse,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::auth::{require_machine, require_not_revoked};
use crate::clock::to_unix;
use crate::images::BlobStore;
use crate::registry::{SessionEntry, SessionSender, SESSION_QUEUE_DEPTH};
use crate::store::{ImageRecord, Inventory, MachineRecord, StoreError};
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

/// The desired state of a machine as the agent must see it; `image` is the
/// record of its desired image, if it has one.
pub fn desired_state(
    machine: &MachineRecord,
    image: Option<&ImageRecord>,
    report_interval: Duration,
) -> DesiredState {
    let rollback = machine
        .desired_image
        .as_ref()
        .is_some_and(|desired| desired.rollback);
    DesiredState {
        version: machine.desired_version,
        labels: machine.labels.clone().into_iter().collect(),
        zone: machine.zone.clone(),
        report_interval_seconds: u32::try_from(report_interval.as_secs()).unwrap_or(u32::MAX),
        image: image.map(|image| DesiredImage {
            image: Some(ImageRef {
                name: image.name.clone(),
                version: image.version.clone(),
                digest: image.digest.clone(),
            }),
            size: image.size,
            manifest_json: image.manifest_json.clone(),
            signature: image.signature.clone(),
            rollback,
            rollout_id: String::new(),
        }),
        quarantine: None,
        access: None,
    }
}

/// [`desired_state`] with the machine's desired image read from the store.
pub async fn desired_state_of(
    state: &ServerState,
    machine: &MachineRecord,
) -> Result<DesiredState, StoreError> {
    let image = match &machine.desired_image {
        Some(desired) => state.store.image(&desired.name, &desired.version).await?,
        None => None,
    };
    let mut desired = desired_state(machine, image.as_ref(), state.config.report_interval);
    desired.quarantine = state
        .repair
        .store
        .quarantine(machine.id)
        .await?
        .as_ref()
        .map(crate::api::repair::quarantine_to_proto);
    // Access travels with every desired state, so a machine that was away
    // gets the current policy on reconnect, before anything else.
    desired.access = Some(crate::api::access::access_policy_for(state, machine));
    Ok(desired)
}

/// Bytes per image chunk sent to agents.
const IMAGE_CHUNK_BYTES: usize = 256 * 1024;

/// How long a push may wait for room in a session's queue.
const PUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends a machine's whole desired state to its live session, if it has one.
/// A session whose queue stays full is ended instead: the agent reconnects
/// and receives the whole state on connect, so a change is never lost.
pub async fn push_desired_state(state: &ServerState, machine: &MachineRecord) {
    if state.registry.sender(machine.id).is_none() {
        return;
    }
    let desired = match desired_state_of(state, machine).await {
        Ok(desired) => desired,
        Err(error) => {
            // The agent gets the whole state when it reconnects.
            tracing::error!(machine = %machine.id, %error, "cannot build desired state; ending the session");
            state.registry.end_session(machine.id);
            return;
        }
    };
    send_desired_state(state, machine.id, desired).await;
}

/// Sends an already built desired state to a machine's live session, if it
/// has one (see [`push_desired_state`] for a full queue).
pub async fn send_desired_state(state: &ServerState, machine_id: Uuid, desired: DesiredState) {
    let Some(sender) = state.registry.sender(machine_id) else {
        return;
    };
    let message = ServerMessage {
        kind: Some(ServerKind::DesiredState(desired)),
    };
    match tokio::time::timeout(PUSH_TIMEOUT, sender.send(Ok(message))).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {} // the session ended meanwhile; it gets the state on reconnect
        Err(_) => {
            tracing::warn!(machine = %machine_id, "session queue full; ending the session so the agent resyncs");
            state.registry.end_session(machine_id);
        }
    }
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
        let (machine_id, _caller) = require_machine(&request)?;
        let FetchImageRequest { digest, offset } = request.into_inner();
        let machine = self.state.store.machine(machine_id).await?.ok_or_else(|| {
            Status::permission_denied(format!(
                "machine {machine_id} is not enrolled on this server"
            ))
        })?;
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
        let path = BlobStore::new(&self.state.config.data_dir).blob_path(&digest);
        let mut file = tokio::fs::File::open(&path).await.map_err(|error| {
            Status::not_found(format!("image blob {digest} is missing: {error}"))
        })?;
        let size = file
            .metadata()
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .len();
        if offset > size {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the end ({size} bytes)"
            )));
        }
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|error| Status::internal(error.to_string()))?;
        let (sender, receiver) = mpsc::channel(4);
        let bytes_served = self.state.metrics.image_bytes_served.clone();
        tokio::spawn(async move {
            let mut position = offset;
            let mut buffer = vec![0u8; IMAGE_CHUNK_BYTES];
            loop {
                let read = match file.read(&mut buffer).await {
                    Ok(0) => return,
                    Ok(read) => read,
                    Err(error) => {
                        let _ = sender.send(Err(Status::internal(error.to_string()))).await;
                        return;
                    }
                };
                let chunk = ImageChunk {
                    offset: position,
                    data: buffer[..read].to_vec(),
                };
                position += read as u64;
                if sender.send(Ok(chunk)).await.is_err() {
                    return;
                }
                bytes_served.inc_by(read as u64);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn upload_forensics(
        &self,
        request: Request<Streaming<ForensicsChunk>>,
    ) -> Result<Response<UploadForensicsResponse>, Status> {
        crate::api::repair::upload_forensics(&self.state, request).await
    }

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (machine_id, caller) = require_machine(&request)?;
        let state = Arc::clone(&self.state);
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
        crate::api::enrollment::require_valid_hostname(
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
        tracing::info!(machine = %machine_id, remote = %caller.peer.remote_address, hostname = %hello.inventory.as_ref().map(|i| i.hostname.as_str()).unwrap_or(""), "agent session opened");
        // Registered first, read second: a change committed before this read
        // is in the state sent now, and one committed after it is pushed
        // through the registry. Reading before registering could miss both.
        let fresh = state.store.machine(machine_id).await?.unwrap_or(machine);
        let desired = desired_state_of(&state, &fresh).await?;
        sender
            .send(Ok(ServerMessage {
                kind: Some(ServerKind::DesiredState(desired)),
            }))
            .await
            .map_err(|_| Status::cancelled("session closed"))?;

        tokio::spawn(serve_session(
            state, machine_id, session_id, inbound, sender, cancel,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
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
) {
    let end_reason = loop {
        let message = tokio::select! {
            () = cancel.cancelled() => {
                let _ = sender.try_send(Err(Status::aborted("session closed by the server (replaced by a newer session, or server shutdown)")));
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
                state.health.observe_report(machine_id, report, now);
                state.rollouts.machine_changed(machine_id);
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
                renew_certificate(&state, machine_id, &renewal.csr_pem, &sender).await;
            }
            Some(AgentKind::AccessState(access)) => {
                crate::api::access::record_access_state(&state, machine_id, access, now);
            }
        }
    };
    if state.registry.unregister(machine_id, session_id).is_some() {
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
    sender: &SessionSender,
) {
    let identity =
        flotte_proto::identity::Identity::machine(&state.config.trust_domain, machine_id);
    let issued = match state.ca.issue_client_from_csr(
        csr_pem,
        &identity,
        state.config.machine_certificate_ttl,
    ) {
        Ok(issued) => issued,
        Err(error) => {
            tracing::warn!(machine = %machine_id, %error, "certificate renewal refused");
            return;
        }
    };
    let not_after = to_unix(issued.not_after);
    // Record before answering: the serial on file is what re-enrollment trusts.
    if let Err(error) = state
        .store
        .record_certificate(machine_id, &issued.serial_hex, not_after)
        .await
    {
        tracing::error!(machine = %machine_id, %error, "cannot record renewed certificate");
        return;
    }
    tracing::info!(machine = %machine_id, serial = %issued.serial_hex, not_after, "machine certificate renewed");
    let _ = sender
        .send(Ok(ServerMessage {
            kind: Some(ServerKind::CertificateIssued(CertificateIssued {
                certificate_pem: issued.certificate_pem,
                not_after,
            })),
        }))
        .await;
}
