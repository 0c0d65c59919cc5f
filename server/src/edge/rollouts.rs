//! `flotte.v1.Rollouts`: create (with dry run), list, show, watch, and the
//! operator commands. Every call passes the admin gate (mutations are
//! audited); rollout domain types become proto types only here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotte_proto::v1::rollouts_server::Rollouts;
use flotte_proto::v1::{
    CreateRolloutRequest, CreateRolloutResponse, ListRolloutsRequest, ListRolloutsResponse,
    RolloutInfo, RolloutMachine as RolloutMachineInfo, RolloutRequest, RolloutStage,
    StopAllRolloutsRequest,
};
use futures::Stream;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::domain::rollout::controller::Command;
use crate::domain::rollout::{MachineRolloutState, RolloutError};
use crate::edge::guard::admit;
use crate::live::rollout::{CreateRequest, RolloutDetail};
use crate::ServerState;
use flotte_common::roles::AdminRpc;

/// A watch sends at most one update per this interval (a wave of thousands
/// of machines changes many times a second).
const WATCH_MIN_INTERVAL: Duration = Duration::from_millis(200);
/// …and at least one per this interval (bake countdowns).
const WATCH_MAX_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct RolloutsApi {
    state: Arc<ServerState>,
}

impl RolloutsApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        RolloutsApi { state }
    }
}

impl From<RolloutError> for Status {
    fn from(error: RolloutError) -> Self {
        match error {
            RolloutError::Plan(_) | RolloutError::NoMachines => {
                Status::invalid_argument(error.to_string())
            }
            RolloutError::NotFound(_) => Status::not_found(error.to_string()),
            RolloutError::Refused(_)
            | RolloutError::Conflict { .. }
            | RolloutError::NeedsForce { .. } => Status::failed_precondition(error.to_string()),
            RolloutError::Store(error) => Status::from(error),
        }
    }
}

fn image_text(image: Option<&crate::store::DesiredImageRecord>) -> String {
    image.map_or_else(String::new, |image| {
        format!("{}@{}", image.name, image.version)
    })
}

/// The proto view of a rollout; `with_machines` false for listings.
pub fn rollout_info(detail: &RolloutDetail, with_machines: bool) -> RolloutInfo {
    let rollout = &detail.rollout;
    let stages = rollout
        .plan
        .stages
        .iter()
        .enumerate()
        .map(|(index, stage)| {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let members: Vec<_> = detail
                .machines
                .iter()
                .filter(|machine| machine.stage == index)
                .collect();
            let count = |wanted: &dyn Fn(MachineRolloutState) -> bool| {
                u32::try_from(members.iter().filter(|m| wanted(m.state)).count()).unwrap_or(0)
            };
            RolloutStage {
                name: stage.name.clone(),
                selector: stage.selector.clone(),
                batch: stage.batch.to_string(),
                bake_seconds: stage.bake_seconds,
                approval: stage.approval,
                approved: rollout.approved_stages.contains(&index),
                max_unavailable_per_zone: stage.max_unavailable_per_zone.unwrap_or(0),
                machines: u32::try_from(members.len()).unwrap_or(u32::MAX),
                waves: u32::try_from(
                    rollout
                        .wave_stages
                        .iter()
                        .filter(|wave_stage| **wave_stage == index)
                        .count(),
                )
                .unwrap_or(0),
                committed: count(&|state| state == MachineRolloutState::Committed),
                failed: count(&|state| state == MachineRolloutState::Failed),
                rolled_back: count(&|state| state == MachineRolloutState::RolledBack),
                in_flight: count(&|state| {
                    state.is_in_flight() || state == MachineRolloutState::RollingBack
                }),
            }
        })
        .collect();
    let machines = if with_machines {
        detail
            .machines
            .iter()
            .map(|machine| RolloutMachineInfo {
                machine_id: machine.machine_id.to_string(),
                hostname: machine.hostname.clone(),
                zone: machine.zone.clone(),
                stage: machine.stage,
                wave: machine.wave,
                state: machine.state.as_str().to_owned(),
                previous_image: image_text(machine.previous_image.as_ref()),
                turn_at: machine.turn_at.unwrap_or(0),
                sent_at: machine.sent_at.unwrap_or(0),
                committed_at: machine.committed_at.unwrap_or(0),
                finished_at: machine.finished_at.unwrap_or(0),
                failure_reason: machine.failure_reason.clone(),
            })
            .collect()
    } else {
        Vec::new()
    };
    RolloutInfo {
        id: rollout.id.to_string(),
        image: rollout.image.reference(),
        digest: rollout.image.digest.clone(),
        state: rollout.state.as_str().to_owned(),
        reason: rollout.reason.clone(),
        created_at: rollout.created_at,
        created_by: rollout.created_by.clone(),
        updated_at: rollout.updated_at,
        plan_toml: rollout.plan_toml.clone(),
        stages,
        machines,
        current_wave: rollout.current_wave,
        wave_count: rollout.wave_count(),
        waiting_for: detail.waiting_for.clone(),
        failures: u32::try_from(detail.failures).unwrap_or(u32::MAX),
        max_failures: u32::try_from(detail.max_failures).unwrap_or(u32::MAX),
        machine_count: u32::try_from(detail.machines.len()).unwrap_or(u32::MAX),
        on_failure: match rollout.plan.policy.on_failure {
            crate::domain::rollout::OnFailure::Rollback => "rollback".to_owned(),
            crate::domain::rollout::OnFailure::Halt => "halt".to_owned(),
        },
        machine_deadline_seconds: rollout.plan.policy.machine_deadline_seconds,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<RolloutInfo, Status>> + Send>>;

impl RolloutsApi {
    /// An operator command on one rollout (pause, resume, abort, approve, rollback).
    async fn command(
        &self,
        request: Request<RolloutRequest>,
        rpc: AdminRpc,
        command: Command,
    ) -> Result<Response<RolloutInfo>, Status> {
        let id = request.get_ref().id.clone();
        let call = admit(&self.state, &request, rpc, json!({ "rollout": id })).await?;
        let state = Arc::clone(&self.state);
        let actor = call.actor().to_owned();
        call.run(
            async move {
                let id = state.rollouts.resolve(&id).await?;
                let detail = state.rollouts.command(&state, id, command, &actor).await?;
                Ok(rollout_info(&detail, false))
            },
            |info: &RolloutInfo| format!("{} {}", info.id, info.state),
        )
        .await
    }
}

#[tonic::async_trait]
impl Rollouts for RolloutsApi {
    type WatchRolloutStream = WatchStream;

    async fn create_rollout(
        &self,
        request: Request<CreateRolloutRequest>,
    ) -> Result<Response<CreateRolloutResponse>, Status> {
        let arguments = {
            let request = request.get_ref();
            json!({
                "image": request.image,
                "dry_run": request.dry_run,
                "force": request.force,
                "plan": request.plan_toml,
            })
        };
        let call = admit(&self.state, &request, AdminRpc::CreateRollout, arguments).await?;
        let state = Arc::clone(&self.state);
        let actor = call.actor().to_owned();
        let request = request.into_inner();
        call.run(
            async move {
                let created = state
                    .rollouts
                    .create(
                        &state,
                        CreateRequest {
                            image: request.image,
                            plan_toml: request.plan_toml,
                            dry_run: request.dry_run,
                            force: request.force,
                            actor,
                        },
                    )
                    .await?;
                Ok(CreateRolloutResponse {
                    rollout: Some(rollout_info(&created.detail, true)),
                    dry_run: request.dry_run,
                    warnings: created.warnings,
                })
            },
            |response: &CreateRolloutResponse| {
                let id = response
                    .rollout
                    .as_ref()
                    .map(|r| r.id.clone())
                    .unwrap_or_default();
                if response.dry_run {
                    format!("dry run {id}")
                } else {
                    id
                }
            },
        )
        .await
    }

    async fn list_rollouts(
        &self,
        request: Request<ListRolloutsRequest>,
    ) -> Result<Response<ListRolloutsResponse>, Status> {
        let call = admit(&self.state, &request, AdminRpc::ListRollouts, json!({})).await?;
        let state = Arc::clone(&self.state);
        call.run(
            async move {
                let mut rollouts = Vec::new();
                for rollout in state.rollouts.list().await? {
                    let detail = state.rollouts.detail(&state, rollout.id).await?;
                    rollouts.push(rollout_info(&detail, false));
                }
                Ok(ListRolloutsResponse { rollouts })
            },
            |_| String::new(),
        )
        .await
    }

    async fn get_rollout(
        &self,
        request: Request<RolloutRequest>,
    ) -> Result<Response<RolloutInfo>, Status> {
        let call = admit(&self.state, &request, AdminRpc::GetRollout, json!({})).await?;
        let state = Arc::clone(&self.state);
        let id = request.into_inner().id;
        call.run(
            async move {
                let id = state.rollouts.resolve(&id).await?;
                let detail = state.rollouts.detail(&state, id).await?;
                Ok(rollout_info(&detail, true))
            },
            |_| String::new(),
        )
        .await
    }

    async fn watch_rollout(
        &self,
        request: Request<RolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let call = admit(&self.state, &request, AdminRpc::WatchRollout, json!({})).await?;
        drop(call);
        let state = Arc::clone(&self.state);
        let id = state.rollouts.resolve(&request.into_inner().id).await?;
        // Subscribed before the first snapshot, so no change falls between.
        let mut changes = state.rollouts.subscribe();
        let first = state.rollouts.detail(&state, id).await?;
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut detail = first;
            loop {
                let finished = detail.rollout.state.is_terminal();
                if sender.send(Ok(rollout_info(&detail, true))).await.is_err() || finished {
                    return;
                }
                let deadline = tokio::time::Instant::now() + WATCH_MAX_INTERVAL;
                loop {
                    match tokio::time::timeout_at(deadline, changes.recv()).await {
                        Ok(Ok(changed)) if changed != id => continue,
                        Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return,
                        // Our rollout changed, we lagged (it may have), or time is up.
                        _ => break,
                    }
                }
                tokio::time::sleep(WATCH_MIN_INTERVAL).await;
                detail = match state.rollouts.detail(&state, id).await {
                    Ok(detail) => detail,
                    Err(error) => {
                        let _ = sender.send(Err(Status::from(error))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn pause_rollout(
        &self,
        request: Request<RolloutRequest>,
    ) -> Result<Response<RolloutInfo>, Status> {
        self.command(request, AdminRpc::PauseRollout, Command::Pause)
            .await
    }

    async fn resume_rollout(
        &self,
        request: Request<RolloutRequest>,
    ) -> Result<Response<RolloutInfo>, Status> {
        self.command(request, AdminRpc::ResumeRollout, Command::Resume)
            .await
    }

    async fn abort_rollout(
        &self,
        request: Request<RolloutRequest>,
    ) -> Result<Response<RolloutInfo>, Status> {
        self.command(request, AdminRpc::AbortRollout, Command::Abort)
            .await
    }

    async fn approve_rollout(
        &self,
        request: Request<RolloutRequest>,
    ) -> Result<Response<RolloutInfo>, Status> {
        self.command(request, AdminRpc::ApproveRollout, Command::Approve)
            .await
    }

    async fn rollback_rollout(
        &self,
        request: Request<RolloutRequest>,
    ) -> Result<Response<RolloutInfo>, Status> {
        self.command(request, AdminRpc::RollbackRollout, Command::Rollback)
            .await
    }

    async fn stop_all_rollouts(
        &self,
        request: Request<StopAllRolloutsRequest>,
    ) -> Result<Response<ListRolloutsResponse>, Status> {
        let call = admit(&self.state, &request, AdminRpc::StopAllRollouts, json!({})).await?;
        let state = Arc::clone(&self.state);
        let actor = call.actor().to_owned();
        call.run(
            async move {
                let stopped = state.rollouts.stop_all(&state, &actor).await?;
                Ok(ListRolloutsResponse {
                    rollouts: stopped
                        .iter()
                        .map(|detail| rollout_info(detail, false))
                        .collect(),
                })
            },
            |response: &ListRolloutsResponse| {
                let ids: Vec<&str> = response.rollouts.iter().map(|r| r.id.as_str()).collect();
                format!(
                    "paused {}",
                    if ids.is_empty() {
                        "none".to_owned()
                    } else {
                        ids.join(", ")
                    }
                )
            },
        )
        .await
    }
}
