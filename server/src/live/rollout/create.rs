//! Creating a rollout: the plan parsed, the candidates chosen, waves
//! assigned, and (unless a dry run) the rollout stored — the store refusing
//! an overlap with another active rollout in the insert's own transaction.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use super::pass::previous_image;
use super::{detail_of, quarantined_machines, ActiveRollout, RolloutDetail, RolloutEngine};
use crate::domain::rollout::plan::parse_plan;
use crate::domain::rollout::preflight::{reasons_to_force, ForceReason, PreflightMachine};
use crate::domain::rollout::waves::{assign_waves, candidates, wave_stages};
use crate::domain::rollout::{
    MachineRolloutState, Rollout, RolloutError, RolloutImage, RolloutMachine, RolloutState,
};
use crate::store::RolloutCreation;
use crate::ServerState;

/// What an operator asks for when creating a rollout.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub image: String,
    pub plan_toml: String,
    pub dry_run: bool,
    /// Start even if preflight finds reasons not to (a downgrade, every
    /// machine unreachable).
    pub force: bool,
    pub actor: String,
}

/// A created (or dry-run) rollout, and what preflight found: reasons a
/// dry run shows and a forced creation went past.
#[derive(Debug, Clone)]
pub struct CreatedRollout {
    pub detail: RolloutDetail,
    pub warnings: Vec<String>,
}

impl RolloutEngine {
    /// Validates, assigns waves, checks what needs `--force`, and (unless a
    /// dry run) stores and starts a rollout.
    pub async fn create(
        &self,
        state: &ServerState,
        request: CreateRequest,
    ) -> Result<CreatedRollout, RolloutError> {
        let plan = parse_plan(&request.plan_toml)?;
        let wanted: flotte_proto::image::ImageReference =
            request
                .image
                .parse()
                .map_err(|error: flotte_proto::image::ImageError| {
                    RolloutError::Refused(format!("image {:?}: {error}", request.image))
                })?;
        let image = state
            .store
            .image(&wanted.name, &wanted.version.to_string())
            .await?
            .ok_or_else(|| RolloutError::Refused(format!("no image {wanted}: push it first")))?;
        let machines = state.store.machines().await?;
        // A machine set aside for investigation is not part of a new rollout.
        let quarantined = quarantined_machines(state).await;
        let assignments = assign_waves(&plan, &candidates(&machines, &quarantined));
        if assignments.is_empty() {
            return Err(RolloutError::NoMachines);
        }
        let now = state.clock.now_unix();
        let mut rollout = Rollout {
            id: Uuid::new_v4(),
            image: RolloutImage {
                name: image.name.clone(),
                version: image.version.clone(),
                digest: image.digest.clone(),
            },
            plan,
            plan_toml: request.plan_toml.clone(),
            state: RolloutState::Pending,
            reason: format!("created by {}", request.actor),
            created_at: now,
            created_by: request.actor.clone(),
            updated_at: now,
            wave_stages: wave_stages(&assignments),
            current_wave: 0,
            wave_started_at: None,
            approved_stages: Vec::new(),
            revision: 0,
        };
        let by_id: HashMap<Uuid, &crate::store::MachineRecord> = machines
            .iter()
            .map(|machine| (machine.id, machine))
            .collect();
        let members: Vec<RolloutMachine> = assignments
            .iter()
            .map(|assignment| RolloutMachine {
                rollout_id: rollout.id,
                machine_id: assignment.machine,
                hostname: assignment.hostname.clone(),
                zone: assignment.zone.clone(),
                stage: assignment.stage,
                wave: assignment.wave,
                state: MachineRolloutState::Pending,
                previous_image: previous_image(state, by_id.get(&assignment.machine).copied()),
                turn_at: None,
                sent_at: None,
                committed_at: None,
                finished_at: None,
                failure_reason: String::new(),
            })
            .collect();
        let reasons = {
            let preflight: Vec<PreflightMachine<'_>> = members
                .iter()
                .map(|member| PreflightMachine {
                    hostname: &member.hostname,
                    running: member.previous_image.as_ref(),
                    state: by_id
                        .get(&member.machine_id)
                        .map_or("", |machine| machine.state.as_str()),
                })
                .collect();
            reasons_to_force(&image.name, &wanted.version, &preflight)
        };
        let warnings: Vec<String> = reasons.iter().map(ForceReason::to_string).collect();
        if !reasons.is_empty() && !request.dry_run {
            if !request.force {
                return Err(RolloutError::NeedsForce {
                    image: rollout.image.reference(),
                    reasons: warnings.join("; "),
                });
            }
            rollout.plan.policy.allows_downgrade = reasons
                .iter()
                .any(|reason| matches!(reason, ForceReason::Downgrade { .. }));
            rollout.reason = format!(
                "created by {} with --force past {}",
                request.actor,
                warnings.join("; ")
            );
        }
        let mut active = self.active.lock().await;
        let mut conflicts: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
        {
            let held = self.members();
            for member in &members {
                if let Some(other) = held.get(&member.machine_id) {
                    conflicts
                        .entry(*other)
                        .or_default()
                        .push(member.hostname.clone());
                }
            }
        }
        if let Some((other, hostnames)) = conflicts.into_iter().next() {
            return Err(RolloutError::Conflict {
                rollout: other,
                machines: hostnames.join(", "),
            });
        }
        if request.dry_run {
            return Ok(CreatedRollout {
                detail: detail_of(state, rollout, members).await,
                warnings,
            });
        }
        // The store checks again, in the insert's transaction: the map above
        // is this process's view, the store is every writer's.
        if let RolloutCreation::Overlap {
            rollout: other,
            machines,
        } = self.store.insert_rollout(&rollout, &members).await?
        {
            let hostnames: Vec<&str> = members
                .iter()
                .filter(|member| machines.contains(&member.machine_id))
                .map(|member| member.hostname.as_str())
                .collect();
            return Err(RolloutError::Conflict {
                rollout: other,
                machines: hostnames.join(", "),
            });
        }
        {
            let mut held = self.members();
            for member in &members {
                held.insert(member.machine_id, rollout.id);
            }
        }
        self.announce(
            state,
            &rollout,
            "rollout.created",
            &format!(
                "{} on {} machines in {} waves",
                rollout.image.reference(),
                members.len(),
                rollout.wave_count()
            ),
            &request.actor,
        );
        active.insert(
            rollout.id,
            ActiveRollout {
                rollout: rollout.clone(),
                machines: members.clone(),
            },
        );
        drop(active);
        self.changed(state, rollout.id, None).await;
        Ok(CreatedRollout {
            detail: detail_of(state, rollout, members).await,
            warnings,
        })
    }
}
