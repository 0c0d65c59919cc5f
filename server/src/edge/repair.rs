//! `flotte.v1.Repair` and `flotte.v1.DisasterRecovery` (admin), and the
//! agent's forensic upload (`AgentSession.UploadForensics`, delegated here
//! from `session`). Conversion between proto and the domain of `repair`.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use flotte_proto::identity::is_valid_segment;
use flotte_proto::v1::disaster_recovery_server::DisasterRecovery;
use flotte_proto::v1::repair_server::Repair;
use flotte_proto::v1::{
    ForensicBundleInfo, ForensicsChunk, ForensicsDownloadChunk, GetForensicsRequest, GroupImpact,
    ListRemediationsRequest, ListRemediationsResponse, Quarantine, QuarantineInfo,
    QuarantineMachineRequest, ReleaseMachineRequest, RemediationEvent, RemediationStatusRequest,
    RemediationStatusResponse, SinglePoint, SinglePointsRequest, SinglePointsResponse,
    UploadForensicsResponse, ZoneLossImpactRequest, ZoneLossImpactResponse,
};
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::domain::repair::dr::{single_points_of_failure, zone_loss_impact, DrMachine, NO_GROUP};
use crate::edge::auth::{require_machine, require_not_revoked};
use crate::edge::guard::admit;
use crate::forensics::ForensicsError;
use crate::services::forensics::{begin_upload_for_machine, ForensicUpload, ForensicUploadError};
use crate::services::machines::find_machine;
use crate::services::quarantine::{quarantine_by_hand, release_by_hand, QuarantineError};
use crate::store::repair::{QuarantineRecord, RemediationEventRecord};
use crate::ServerState;
use flotte_common::roles::AdminRpc;

/// Bytes per forensic download chunk.
const DOWNLOAD_CHUNK_BYTES: usize = 256 * 1024;
/// Grouping label when none is given.
const DEFAULT_GROUP_LABEL: &str = "role";

#[derive(Debug, Clone)]
pub struct RepairApi {
    state: Arc<ServerState>,
}

impl RepairApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        RepairApi { state }
    }
}

pub fn quarantine_to_proto(record: &QuarantineRecord) -> Quarantine {
    Quarantine {
        id: record.id.clone(),
        reason: record.reason.clone(),
        since: record.since,
        by: record.by.clone(),
    }
}

fn event_to_proto(event: &RemediationEventRecord) -> RemediationEvent {
    RemediationEvent {
        id: event.id.clone(),
        machine_id: event.machine_id.to_string(),
        hostname: event.hostname.clone(),
        zone: event.zone.clone(),
        labels: event.labels.clone().into_iter().collect(),
        provider: event.provider.clone(),
        state: event.state.as_str().to_owned(),
        reason: event.reason.clone(),
        opened_at: event.opened_at,
        updated_at: event.updated_at,
        replacement_machine_id: event
            .replacement_machine_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        detail: event.detail.clone(),
    }
}

impl From<ForensicsError> for Status {
    fn from(error: ForensicsError) -> Self {
        match error {
            ForensicsError::BadQuarantineId(_) => Status::invalid_argument(error.to_string()),
            ForensicsError::AlreadyStored(_) => Status::already_exists(error.to_string()),
            ForensicsError::UploadInProgress(_) => Status::aborted(error.to_string()),
            ForensicsError::Io { .. } if error.is_disk_full() => {
                crate::edge::disk_full_status(&error)
            }
            ForensicsError::Io { .. } | ForensicsError::StoredDiffers { .. } => {
                Status::internal(error.to_string())
            }
            ForensicsError::Store(error) => error.into(),
        }
    }
}

impl From<ForensicUploadError> for Status {
    fn from(error: ForensicUploadError) -> Self {
        match error {
            ForensicUploadError::NotQuarantined(_)
            | ForensicUploadError::NotCurrentQuarantine { .. } => {
                Status::failed_precondition(error.to_string())
            }
            ForensicUploadError::AlreadyUploaded(_) => Status::already_exists(error.to_string()),
            ForensicUploadError::UploadInProgress(_) => Status::aborted(error.to_string()),
            ForensicUploadError::BundleTooLarge { .. }
            | ForensicUploadError::QuotaExceeded { .. } => {
                Status::resource_exhausted(error.to_string())
            }
            ForensicUploadError::Files(error) => error.into(),
            ForensicUploadError::Store(error) => error.into(),
        }
    }
}

fn group_label(by: &str) -> Result<String, Status> {
    let by = if by.is_empty() {
        DEFAULT_GROUP_LABEL
    } else {
        by
    };
    flotte_proto::labels::validate_label(by, "x")
        .map_err(|error| Status::invalid_argument(format!("--by: {error}")))?;
    Ok(by.to_owned())
}

/// Every machine in service or quarantined (not retired), as the DR
/// computations see it, grouped by the value of `by`.
async fn dr_machines(state: &ServerState, by: &str) -> Result<Vec<DrMachine>, Status> {
    let machines = state.store.machines().await?;
    let quarantined = crate::live::repair_state::quarantined_ids(state).await?;
    let tracked = state.health.snapshot();
    Ok(machines
        .iter()
        .filter(|machine| machine.retired_at.is_none())
        .map(|machine| DrMachine {
            zone: machine.zone.clone(),
            group: machine
                .labels
                .get(by)
                .cloned()
                .unwrap_or_else(|| NO_GROUP.to_owned()),
            state: tracked
                .get(&machine.id)
                .map_or(crate::domain::health::MachineState::Unknown, |health| {
                    health.state
                }),
            quarantined: quarantined.contains(&machine.id),
        })
        .collect())
}

type DownloadStream =
    Pin<Box<dyn futures::Stream<Item = Result<ForensicsDownloadChunk, Status>> + Send>>;

impl From<QuarantineError> for Status {
    fn from(error: QuarantineError) -> Self {
        match error {
            QuarantineError::Machine(error) => error.into(),
            QuarantineError::NotQuarantined(_) => Status::failed_precondition(error.to_string()),
            QuarantineError::Store(error) => error.into(),
        }
    }
}

#[tonic::async_trait]
impl Repair for RepairApi {
    async fn quarantine_machine(
        &self,
        request: Request<QuarantineMachineRequest>,
    ) -> Result<Response<QuarantineInfo>, Status> {
        let arguments =
            json!({ "machine": request.get_ref().id, "reason": request.get_ref().reason });
        let call = admit(
            &self.state,
            &request,
            AdminRpc::QuarantineMachine,
            arguments,
        )
        .await?;
        let state = Arc::clone(&self.state);
        let actor = call.actor().to_owned();
        let request = request.into_inner();
        call.run(
            async move {
                let (machine, record) =
                    quarantine_by_hand(&state, &request.id, &request.reason, &actor).await?;
                Ok(QuarantineInfo {
                    machine_id: machine.id.to_string(),
                    hostname: machine.inventory.hostname.clone(),
                    quarantine: Some(quarantine_to_proto(&record)),
                })
            },
            |info| {
                info.quarantine
                    .as_ref()
                    .map(|quarantine| format!("quarantine {}", quarantine.id))
                    .unwrap_or_default()
            },
        )
        .await
    }

    async fn release_machine(
        &self,
        request: Request<ReleaseMachineRequest>,
    ) -> Result<Response<QuarantineInfo>, Status> {
        let arguments = json!({ "machine": request.get_ref().id });
        let call = admit(&self.state, &request, AdminRpc::ReleaseMachine, arguments).await?;
        let state = Arc::clone(&self.state);
        let actor = call.actor().to_owned();
        let request = request.into_inner();
        call.run(
            async move {
                let machine = release_by_hand(&state, &request.id, &actor).await?;
                Ok(QuarantineInfo {
                    machine_id: machine.id.to_string(),
                    hostname: machine.inventory.hostname.clone(),
                    quarantine: None,
                })
            },
            |_| String::new(),
        )
        .await
    }

    type GetForensicsStream = DownloadStream;

    async fn get_forensics(
        &self,
        request: Request<GetForensicsRequest>,
    ) -> Result<Response<Self::GetForensicsStream>, Status> {
        let arguments = json!({
            "machine": request.get_ref().id,
            "quarantine": request.get_ref().quarantine_id,
            "list_only": request.get_ref().list_only,
        });
        admit(&self.state, &request, AdminRpc::GetForensics, arguments).await?;
        let request = request.into_inner();
        let machines = self.state.store.machines().await?;
        let machine = find_machine(&machines, &request.id)?;
        let forensics = &self.state.repair.forensics;
        let bundles: Vec<ForensicBundleInfo> = forensics
            .list(machine.id)
            .await?
            .into_iter()
            .map(|bundle| ForensicBundleInfo {
                quarantine_id: bundle.quarantine_id,
                received_at: bundle.received_at,
                size: bundle.size,
            })
            .collect();
        if request.list_only {
            let listing = ForensicsDownloadChunk {
                machine_id: machine.id.to_string(),
                bundles,
                ..ForensicsDownloadChunk::default()
            };
            return Ok(Response::new(Box::pin(tokio_stream::once(Ok(listing)))));
        }
        let wanted = Some(request.quarantine_id.as_str()).filter(|id| !id.is_empty());
        let bundle = forensics.find(machine.id, wanted).await?.ok_or_else(|| {
            Status::not_found(match wanted {
                Some(id) => format!(
                    "no forensic bundle of quarantine {} for {} (see --list)",
                    flotte_proto::names::quoted_prefix(id),
                    machine.inventory.hostname
                ),
                None => format!(
                    "no forensic bundle for {} (quarantine it, and wait for its agent to upload one)",
                    machine.inventory.hostname
                ),
            })
        })?;
        let mut first = Some(ForensicsDownloadChunk {
            machine_id: machine.id.to_string(),
            quarantine_id: bundle.quarantine_id.clone(),
            received_at: bundle.received_at,
            size: bundle.size,
            sha256: bundle.sha256.clone(),
            data: Vec::new(),
            bundles,
        });
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let forensics = Arc::clone(forensics);
        let machine_id = machine.id;
        tokio::spawn(async move {
            let mut offset = 0u64;
            loop {
                let data = match forensics
                    .read_at(machine_id, &bundle, offset, DOWNLOAD_CHUNK_BYTES)
                    .await
                {
                    Ok(data) => data,
                    Err(error) => {
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                };
                if data.is_empty() && first.is_none() {
                    return;
                }
                offset += data.len() as u64;
                let ended = data.is_empty();
                let mut chunk = first.take().unwrap_or_default();
                chunk.data = data;
                if sender.send(Ok(chunk)).await.is_err() || ended {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn list_remediations(
        &self,
        request: Request<ListRemediationsRequest>,
    ) -> Result<Response<ListRemediationsResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ListRemediations, json!({})).await?;
        let events = self.state.repair.store.remediations().await?;
        Ok(Response::new(ListRemediationsResponse {
            events: events.iter().map(event_to_proto).collect(),
        }))
    }

    async fn remediation_status(
        &self,
        request: Request<RemediationStatusRequest>,
    ) -> Result<Response<RemediationStatusResponse>, Status> {
        admit(
            &self.state,
            &request,
            AdminRpc::RemediationStatus,
            json!({}),
        )
        .await?;
        let settings = &self.state.config.remediation;
        let status = self.state.repair.status();
        Ok(Response::new(RemediationStatusResponse {
            enabled: settings.enabled(),
            breaker_enabled: settings.breaker,
            breaker_open: status.breaker_open,
            breaker_reasons: status.breaker_reasons,
            in_progress: status.in_progress,
            max_concurrent: settings.max_concurrent,
        }))
    }
}

#[tonic::async_trait]
impl DisasterRecovery for RepairApi {
    async fn zone_loss_impact(
        &self,
        request: Request<ZoneLossImpactRequest>,
    ) -> Result<Response<ZoneLossImpactResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ZoneLossImpact, json!({})).await?;
        let request = request.into_inner();
        let by = group_label(&request.by)?;
        let mut problems = Vec::new();
        if request.zones.is_empty() {
            problems.push("name at least one zone to lose (--zone)".to_owned());
        }
        for zone in &request.zones {
            if !is_valid_segment(zone) {
                problems.push(format!("zone {zone:?} is not a valid zone name"));
            }
        }
        if !problems.is_empty() {
            return Err(Status::invalid_argument(problems.join("; ")));
        }
        let machines = dr_machines(&self.state, &by).await?;
        let known: BTreeSet<&str> = machines
            .iter()
            .map(|machine| machine.zone.as_str())
            .collect();
        if let Some(unknown) = request
            .zones
            .iter()
            .find(|zone| !known.contains(zone.as_str()))
        {
            return Err(Status::not_found(format!(
                "no machine in zone {unknown:?} (zones: {})",
                known.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        let lost: BTreeSet<String> = request.zones.iter().cloned().collect();
        let minimums: BTreeMap<String, u32> = self
            .state
            .config
            .minimums
            .get(&by)
            .cloned()
            .unwrap_or_default();
        let groups = zone_loss_impact(&machines, &lost, &minimums)
            .into_iter()
            .map(|impact| GroupImpact {
                group: impact.group,
                machines_before: impact.machines_before,
                machines_after: impact.machines_after,
                operational_before: impact.operational_before,
                operational_after: impact.operational_after,
                minimum: impact.minimum.unwrap_or(0),
                state_after: impact.state_after.as_str().to_owned(),
            })
            .collect();
        Ok(Response::new(ZoneLossImpactResponse {
            zones: lost.into_iter().collect(),
            by,
            groups,
        }))
    }

    async fn single_points_of_failure(
        &self,
        request: Request<SinglePointsRequest>,
    ) -> Result<Response<SinglePointsResponse>, Status> {
        admit(
            &self.state,
            &request,
            AdminRpc::SinglePointsOfFailure,
            json!({}),
        )
        .await?;
        let by = group_label(&request.into_inner().by)?;
        let machines = dr_machines(&self.state, &by).await?;
        let groups = single_points_of_failure(&machines)
            .into_iter()
            .map(|point| SinglePoint {
                group: point.group,
                zone: point.zone,
                operational: point.operational,
                machines: point.machines,
            })
            .collect();
        Ok(Response::new(SinglePointsResponse { by, groups }))
    }
}

/// Writes `first` and every following chunk of an upload into `upload`.
async fn receive_bundle(
    upload: &mut ForensicUpload,
    first: ForensicsChunk,
    inbound: &mut Streaming<ForensicsChunk>,
) -> Result<(), Status> {
    let mut chunk = Some(first);
    while let Some(ForensicsChunk { data, .. }) = chunk {
        upload.write(&data).await?;
        chunk = inbound.message().await?;
    }
    Ok(())
}

/// `AgentSession.UploadForensics`: a quarantined machine uploads the bundle
/// of its current quarantine; anything else is refused before a byte is stored.
pub async fn upload_forensics(
    state: &ServerState,
    request: Request<Streaming<ForensicsChunk>>,
) -> Result<Response<UploadForensicsResponse>, Status> {
    let (machine_id, caller) = require_machine(&request)?;
    require_not_revoked(&caller, &state.revocations)?;
    let mut inbound = request.into_inner();
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("empty forensic upload"))?;
    let quarantine_id = first.quarantine_id.clone();
    let mut upload = begin_upload_for_machine(state, machine_id, &quarantine_id).await?;
    // A refused or broken-off upload leaves nothing (dropping `upload`, if
    // the call itself is cancelled, does the same in the background).
    if let Err(status) = receive_bundle(&mut upload, first, &mut inbound).await {
        upload.abandon().await;
        return Err(status);
    }
    let stored = upload.finish().await?;
    tracing::info!(machine = %machine_id, quarantine = %quarantine_id, size = stored.size, "forensic bundle received");
    Ok(Response::new(UploadForensicsResponse {
        size: stored.size,
        sha256: stored.sha256,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bundle_disk_is_resource_exhausted_and_other_failures_internal() {
        let failure = |code| ForensicsError::Io {
            path: "/var/lib/flotte-server/forensics/m/q1.tar".into(),
            source: std::io::Error::from_raw_os_error(code),
        };
        for full in [nix::libc::ENOSPC, nix::libc::EDQUOT] {
            let status = Status::from(failure(full));
            assert_eq!(status.code(), tonic::Code::ResourceExhausted);
            assert!(
                status.message().starts_with("the server's disk is full"),
                "{}",
                status.message()
            );
        }
        assert_eq!(
            Status::from(failure(nix::libc::EACCES)).code(),
            tonic::Code::Internal
        );
    }
}
