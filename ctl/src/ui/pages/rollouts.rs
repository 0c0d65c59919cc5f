//! The rollouts pages: the list (with stop-all), and one rollout's stages
//! as progress bars and its machines wave by wave, live, with the buttons
//! its state and the operator's role allow.

use std::sync::Arc;

use flotte_common::roles::AdminRpc;
use flotte_proto::v1::rollouts_client::RolloutsClient;
use flotte_proto::v1::{ListRolloutsRequest, RolloutInfo, RolloutRequest, StopAllRolloutsRequest};
use hyper::Response;
use maud::{html, Markup};

use super::{action_button, layout, time, Section};
use crate::ui::http::{html, redirect, Body, UiError};
use crate::ui::{Dashboard, Operator};

/// A rollout command the page offers: its path word, the RPC it calls (for
/// the role check), its label, and its effect in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RolloutCommand {
    Pause,
    Resume,
    Approve,
    Abort,
    Rollback,
}

impl RolloutCommand {
    const ALL: [RolloutCommand; 5] = [
        RolloutCommand::Pause,
        RolloutCommand::Resume,
        RolloutCommand::Approve,
        RolloutCommand::Abort,
        RolloutCommand::Rollback,
    ];

    fn word(self) -> &'static str {
        match self {
            RolloutCommand::Pause => "pause",
            RolloutCommand::Resume => "resume",
            RolloutCommand::Approve => "approve",
            RolloutCommand::Abort => "abort",
            RolloutCommand::Rollback => "rollback",
        }
    }

    fn rpc(self) -> AdminRpc {
        match self {
            RolloutCommand::Pause => AdminRpc::PauseRollout,
            RolloutCommand::Resume => AdminRpc::ResumeRollout,
            RolloutCommand::Approve => AdminRpc::ApproveRollout,
            RolloutCommand::Abort => AdminRpc::AbortRollout,
            RolloutCommand::Rollback => AdminRpc::RollbackRollout,
        }
    }

    fn label(self) -> &'static str {
        match self {
            RolloutCommand::Pause => "Pause",
            RolloutCommand::Resume => "Resume",
            RolloutCommand::Approve => "Approve",
            RolloutCommand::Abort => "Abort",
            RolloutCommand::Rollback => "Roll back",
        }
    }

    fn effect(self, id: &str) -> String {
        let id = short(id);
        match self {
            RolloutCommand::Pause => format!("Pause rollout {id}: no new machine is sent; swaps already started finish."),
            RolloutCommand::Resume => format!("Resume rollout {id}: machines are sent again, wave by wave."),
            RolloutCommand::Approve => format!("Approve rollout {id}: opens its approval gate, and the next stage starts."),
            RolloutCommand::Abort => format!("Abort rollout {id} for good: every machine is left as it is now."),
            RolloutCommand::Rollback => format!("Roll back rollout {id}: every machine it updated goes back to the image it ran before."),
        }
    }

    /// Whether the command means something in this state (the server
    /// decides; this only avoids drawing buttons that can only be refused).
    fn applies_to(self, info: &RolloutInfo) -> bool {
        let state = info.state.as_str();
        match self {
            RolloutCommand::Pause => matches!(state, "pending" | "running"),
            RolloutCommand::Resume => state == "paused",
            RolloutCommand::Approve => {
                !is_final(state)
                    && info
                        .stages
                        .iter()
                        .any(|stage| stage.approval && !stage.approved)
            }
            RolloutCommand::Abort => !is_final(state),
            RolloutCommand::Rollback => {
                matches!(state, "running" | "paused" | "failed" | "succeeded")
            }
        }
    }

    fn from_word(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|command| command.word() == word)
    }
}

fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "aborted" | "rolled_back")
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Per wave (zero-based), its committed machines and all its machines.
fn waves(info: &RolloutInfo) -> std::collections::BTreeMap<u32, (u32, u32)> {
    let mut waves = std::collections::BTreeMap::new();
    for machine in &info.machines {
        let (committed, machines) = waves.entry(machine.wave).or_insert((0, 0));
        *machines += 1;
        if machine.state == "committed" {
            *committed += 1;
        }
    }
    waves
}

/// The live part of a rollout's page: summary, buttons, stages, machines.
pub fn live_section(operator: &Operator, info: &RolloutInfo) -> Markup {
    let stage_name = |index: u32| {
        info.stages
            .get(index as usize)
            .map(|stage| stage.name.as_str())
            .unwrap_or_default()
    };
    html! {
        p.summary {
            span #rollout-state .(format!("rollout-{}", info.state)) { (info.state) }
            " " (info.image) " · wave " ((info.current_wave + 1).min(info.wave_count)) " of " (info.wave_count)
            " · failures " (info.failures) " of " (info.max_failures)
        }
        @if !info.waiting_for.is_empty() { p #waiting-for { "Waiting for " (info.waiting_for) } }
        @if !info.reason.is_empty() { p { (info.reason) } }
        div.actions {
            @for command in RolloutCommand::ALL {
                @if command.applies_to(info) && operator.may(command.rpc()) {
                    (action_button(&format!("/rollouts/{}/{}", info.id, command.word()),
                        &format!("action-{}", command.word()), command.label(), &command.effect(&info.id)))
                }
            }
        }
        @for stage in &info.stages {
            div.stage data-stage=(stage.name) {
                h3 { (stage.name) " " small { (stage.selector) } }
                progress max=(stage.machines.max(1)) value=(stage.committed) {}
                span.progress-text {
                    (stage.committed) "/" (stage.machines) " committed, " (stage.in_flight) " in flight, "
                    (stage.failed) " failed, " (stage.rolled_back) " rolled back"
                }
                @if stage.approval {
                    span.approval { @if stage.approved { "approved" } @else { "waits for approval" } }
                }
            }
        }
        div.waves {
            @for (wave, (committed, machines)) in waves(info) {
                div.wave data-wave=(wave + 1) {
                    span.wave-name { "wave " (wave + 1) }
                    progress max=(machines) value=(committed) {}
                    span.progress-text { (committed) "/" (machines) }
                }
            }
        }
        table.machines {
            thead { tr { th { "wave" } th { "stage" } th { "machine" } th { "zone" } th { "state" } th { "failure" } } }
            tbody {
                @for machine in &info.machines {
                    tr data-hostname=(machine.hostname) {
                        td { (machine.wave + 1) } td { (stage_name(machine.stage)) }
                        td { a href=(format!("/machines/{}", machine.machine_id)) { (machine.hostname) } }
                        td { (machine.zone) }
                        td.(format!("machine-{}", machine.state)) { (machine.state) }
                        td { (machine.failure_reason) }
                    }
                }
            }
        }
    }
}

/// `GET /rollouts`
pub async fn list(dashboard: &Arc<Dashboard>) -> Result<Response<Body>, UiError> {
    let rollouts = RolloutsClient::new(dashboard.channel.clone())
        .list_rollouts(ListRolloutsRequest {})
        .await
        .map_err(|status| dashboard.rpc_failure(status))?
        .into_inner()
        .rollouts;
    let any_active = rollouts
        .iter()
        .any(|rollout| matches!(rollout.state.as_str(), "pending" | "running"));
    let body = html! {
        @if any_active && dashboard.operator.may(AdminRpc::StopAllRollouts) {
            div.actions {
                (action_button("/rollouts/stop-all", "action-stop-all", "Stop all",
                    "Stop all: pause every pending or running rollout now."))
            }
        }
        table {
            thead { tr { th { "rollout" } th { "image" } th { "state" } th { "wave" } th { "machines" } th { "failures" } th { "created" } th { "by" } } }
            tbody {
                @for rollout in &rollouts {
                    tr {
                        td { a href=(format!("/rollouts/{}", rollout.id)) { (short(&rollout.id)) } }
                        td { (rollout.image) }
                        td.(format!("rollout-{}", rollout.state)) { (rollout.state) }
                        td { ((rollout.current_wave + 1).min(rollout.wave_count)) "/" (rollout.wave_count) }
                        td { (rollout.machine_count) }
                        td { (rollout.failures) "/" (rollout.max_failures) }
                        td { (time(rollout.created_at)) }
                        td { (rollout.created_by) }
                    }
                }
            }
        }
        @if rollouts.is_empty() { p { "No rollout yet." } }
    };
    Ok(html(layout(
        &dashboard.operator,
        "Rollouts",
        Section::Rollouts,
        body,
    )))
}

/// `GET /rollouts/ID`
pub async fn page(dashboard: &Arc<Dashboard>, id: &str) -> Result<Response<Body>, UiError> {
    let info = RolloutsClient::new(dashboard.channel.clone())
        .get_rollout(RolloutRequest { id: id.to_owned() })
        .await
        .map_err(|status| dashboard.rpc_failure(status))?
        .into_inner();
    let body = html! {
        section #rollout data-live=(format!("/events/rollouts/{}", info.id)) {
            (live_section(&dashboard.operator, &info))
        }
    };
    let title = format!("Rollout {}", short(&info.id));
    Ok(html(layout(
        &dashboard.operator,
        &title,
        Section::Rollouts,
        body,
    )))
}

/// `POST /rollouts/ID/COMMAND`: one RPC, then back to the rollout.
pub async fn command(
    dashboard: &Arc<Dashboard>,
    id: &str,
    word: &str,
) -> Result<Response<Body>, UiError> {
    let command = RolloutCommand::from_word(word)
        .ok_or_else(|| UiError::NotFound(format!("rollouts/{id}/{word}")))?;
    let mut client = RolloutsClient::new(dashboard.channel.clone());
    let request = RolloutRequest { id: id.to_owned() };
    let answer = match command {
        RolloutCommand::Pause => client.pause_rollout(request).await,
        RolloutCommand::Resume => client.resume_rollout(request).await,
        RolloutCommand::Approve => client.approve_rollout(request).await,
        RolloutCommand::Abort => client.abort_rollout(request).await,
        RolloutCommand::Rollback => client.rollback_rollout(request).await,
    };
    let info = answer
        .map_err(|status| dashboard.rpc_failure(status))?
        .into_inner();
    Ok(redirect(&format!("/rollouts/{}", info.id)))
}

/// `POST /rollouts/stop-all`
pub async fn stop_all(dashboard: &Arc<Dashboard>) -> Result<Response<Body>, UiError> {
    RolloutsClient::new(dashboard.channel.clone())
        .stop_all_rollouts(StopAllRolloutsRequest {})
        .await
        .map_err(|status| dashboard.rpc_failure(status))?;
    Ok(redirect("/rollouts"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotte_common::roles::Role;
    use flotte_proto::v1::RolloutStage;

    fn gated(state: &str) -> RolloutInfo {
        RolloutInfo {
            id: "0123456789abcdef".into(),
            state: state.into(),
            stages: vec![RolloutStage {
                name: "qualification".into(),
                approval: true,
                machines: 2,
                committed: 1,
                ..RolloutStage::default()
            }],
            ..RolloutInfo::default()
        }
    }

    fn buttons(role: Role, info: &RolloutInfo) -> Vec<&'static str> {
        let operator = Operator {
            name: "x".into(),
            role,
        };
        let rendered = live_section(&operator, info).into_string();
        RolloutCommand::ALL
            .into_iter()
            .map(RolloutCommand::word)
            .filter(|word| rendered.contains(&format!("id=\"action-{word}\"")))
            .collect()
    }

    #[test]
    fn buttons_follow_the_role_and_the_state() {
        assert_eq!(
            buttons(Role::Operator, &gated("running")),
            ["pause", "approve", "abort", "rollback"]
        );
        assert_eq!(
            buttons(Role::Operator, &gated("paused")),
            ["resume", "approve", "abort", "rollback"]
        );
        assert!(buttons(Role::Viewer, &gated("running")).is_empty());
        assert_eq!(buttons(Role::Admin, &gated("succeeded")), ["rollback"]);
        assert!(buttons(Role::Admin, &gated("aborted")).is_empty());
    }

    #[test]
    fn waves_count_their_committed_machines() {
        let machine = |wave: u32, state: &str| flotte_proto::v1::RolloutMachine {
            wave,
            state: state.into(),
            ..Default::default()
        };
        let mut info = gated("running");
        info.machines = vec![
            machine(0, "committed"),
            machine(1, "committed"),
            machine(1, "switching"),
            machine(1, "failed"),
        ];
        let counted: Vec<(u32, (u32, u32))> = waves(&info).into_iter().collect();
        assert_eq!(counted, [(0, (1, 1)), (1, (1, 3))]);
    }

    #[test]
    fn each_button_confirms_its_effect() {
        let operator = Operator {
            name: "x".into(),
            role: Role::Operator,
        };
        let rendered = live_section(&operator, &gated("running")).into_string();
        assert!(
            rendered.contains("data-confirm=\"Pause rollout 01234567: no new machine is sent"),
            "{rendered}"
        );
        assert!(
            rendered.contains("method=\"post\" action=\"/rollouts/0123456789abcdef/abort\""),
            "{rendered}"
        );
    }
}
