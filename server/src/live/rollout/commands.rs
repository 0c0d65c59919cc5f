//! Operator commands on rollouts (pause, resume, abort, approve, rollback,
//! stop-all): each decided by `controller::apply_command`, stored, announced,
//! and the loop woken. They take the same lock as a pass, so a pass never
//! overwrites a pause it did not see.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::{detail_of, ActiveRollout, RolloutDetail, RolloutEngine};
use crate::domain::rollout::controller::{apply_command, Command, CommandEffect};
use crate::domain::rollout::{RolloutError, RolloutState};
use crate::ServerState;

/// How many times a command is decided again when another replica changed
/// the rollout between the read and the write.
const COMMAND_ATTEMPTS: u32 = 3;

impl RolloutEngine {
    /// An operator's command on one rollout.
    pub async fn command(
        &self,
        state: &ServerState,
        id: Uuid,
        command: Command,
        actor: &str,
    ) -> Result<RolloutDetail, RolloutError> {
        // A write from a copy another replica made stale is refused by the
        // store; the command is then decided again on the fresh row.
        let mut attempts_left = COMMAND_ATTEMPTS;
        let current = loop {
            attempts_left -= 1;
            match self.command_once(state, id, &command, actor).await {
                Err(RolloutError::Store(error)) if error.is_retryable() && attempts_left > 0 => {
                    tracing::info!(rollout = %id, %error, "rollout changed meanwhile; deciding the command again");
                }
                other => break other?,
            }
        };
        // A command changes the rollout's row only.
        self.changed(state, id, Some(Vec::new())).await;
        Ok(detail_of(state, current.rollout, current.machines).await)
    }

    /// One attempt at [`RolloutEngine::command`]: decided on the stored row
    /// and stored if that row did not change meanwhile.
    async fn command_once(
        &self,
        state: &ServerState,
        id: Uuid,
        command: &Command,
        actor: &str,
    ) -> Result<ActiveRollout, RolloutError> {
        let mut active = self.active.lock().await;
        // The stored row, not this replica's copy: another replica may
        // have changed it (the leader's pass, an operator's command there).
        let mut current = self.stored(id).await?;
        let effect = apply_command(&current.rollout, command).map_err(RolloutError::Refused)?;
        if effect == CommandEffect::State(RolloutState::RollingBack)
            && current.rollout.state.is_terminal()
        {
            // A finished rollout comes back to life to revert its machines:
            // refuse if another active rollout holds some of them now.
            let held = self.members();
            let taken: Vec<String> = current
                .machines
                .iter()
                .filter(|machine| held.contains_key(&machine.machine_id))
                .map(|machine| machine.hostname.clone())
                .collect();
            if let Some(first) = current
                .machines
                .iter()
                .find(|m| held.contains_key(&m.machine_id))
            {
                return Err(RolloutError::Conflict {
                    rollout: held.get(&first.machine_id).copied().unwrap_or_default(),
                    machines: taken.join(", "),
                });
            }
        }
        let now = state.clock.now_unix();
        let detail = match &effect {
            CommandEffect::State(new_state) => {
                current.rollout.state = *new_state;
                current.rollout.reason = format!("{} by {actor}", command.as_str());
                format!("{} → {new_state}", command.as_str())
            }
            CommandEffect::ApproveStage(stage) => {
                current.rollout.approved_stages.push(*stage);
                let name = current
                    .rollout
                    .plan
                    .stages
                    .get(*stage as usize)
                    .map(|stage| stage.name.clone())
                    .unwrap_or_default();
                format!("stage {name} approved")
            }
        };
        current.rollout.updated_at = now;
        self.store
            .apply_rollout_pass(&current.rollout, &[], &[], None)
            .await?;
        current.rollout.revision += 1;
        self.announce(
            state,
            &current.rollout,
            &format!("rollout.{}", command.as_str()),
            &detail,
            actor,
        );
        self.keep_or_retire(&mut active, current.clone());
        Ok(current)
    }

    /// Pauses every pending or running rollout; returns those it paused.
    pub async fn stop_all(
        &self,
        state: &ServerState,
        actor: &str,
    ) -> Result<Vec<RolloutDetail>, RolloutError> {
        // From the store: a rollout created through another replica a
        // moment ago is stopped too.
        let ids: Vec<Uuid> = self
            .store
            .rollouts()
            .await?
            .iter()
            .filter(|rollout| {
                matches!(rollout.state, RolloutState::Pending | RolloutState::Running)
            })
            .map(|rollout| rollout.id)
            .collect();
        let mut stopped = Vec::new();
        for id in ids {
            match self.command(state, id, Command::Pause, actor).await {
                Ok(detail) => stopped.push(detail),
                // Finished or paused meanwhile: nothing to stop.
                Err(RolloutError::Refused(reason)) => {
                    tracing::info!(%reason, "stop-all skipped a rollout")
                }
                Err(error) => return Err(error),
            }
        }
        Ok(stopped)
    }

    /// Caches `current` while it is active (its machines become members
    /// when it was not cached: a rollout's machines never change after it
    /// is created, so a pass does not re-insert ten thousand of them), or
    /// retires it and frees its machines.
    pub(super) fn keep_or_retire(
        &self,
        active: &mut BTreeMap<Uuid, ActiveRollout>,
        current: ActiveRollout,
    ) {
        let id = current.rollout.id;
        if current.rollout.state.is_terminal() {
            active.remove(&id);
            let mut held = self.members();
            for machine in &current.machines {
                if held.get(&machine.machine_id) == Some(&id) {
                    held.remove(&machine.machine_id);
                }
            }
        } else {
            if !active.contains_key(&id) {
                let mut held = self.members();
                for machine in &current.machines {
                    held.insert(machine.machine_id, id);
                }
            }
            active.insert(id, current);
        }
    }
}
