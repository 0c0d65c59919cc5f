//! `flottectl rollout create | list | show | watch | pause | resume | abort |
//! approve | rollback | stop-all`: staged rollouts, rendered as tables and
//! progress bars (`progress`) for people or JSON (`-o json`) for scripts.

use std::io::IsTerminal;

use clap::Subcommand;
use flotte_proto::v1::rollouts_client::RolloutsClient;
use flotte_proto::v1::{
    CreateRolloutRequest, ListRolloutsRequest, RolloutInfo, RolloutRequest, StopAllRolloutsRequest,
};
use indicatif::ProgressDrawTarget;
use serde::Serialize;

use crate::cli::{read_file, rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{
    self, format_time, note_line, optional_time, print_json, print_json_line, print_line,
    print_table, Output,
};

mod progress;

use progress::{frame_lines, LiveDisplay};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout of an image across the fleet by a plan of stages.
    Create {
        /// The image, name@version (pushed already).
        #[arg(long)]
        image: String,
        /// The plan file (TOML: [[stage]] tables and [policy]).
        #[arg(long)]
        plan: std::path::PathBuf,
        /// Show the stages and waves (machines and zones), and what would
        /// need --force; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start even if it is a downgrade for some machines or all of them
        /// are unreachable (refused otherwise, naming them).
        #[arg(long)]
        force: bool,
    },
    /// Write an example plan to start from (examples/plan.toml: stages,
    /// batches, bakes, approval, policy), to FILE or stdout.
    PlanInit {
        /// The file to write (never overwritten); stdout without it.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// List rollouts, newest first.
    List,
    /// Show a rollout: stages, waves, and every machine's state with timings.
    Show {
        /// The rollout: id or id prefix, as `rollout list` shows it.
        id: String,
    },
    /// Follow a rollout with progress bars; exits 0 if it succeeds, 1 otherwise.
    Watch {
        /// The rollout: id or id prefix, as `rollout list` shows it.
        id: String,
    },
    /// Stop sending new machines (machines already told finish their swap).
    Pause {
        /// The rollout: id or id prefix, as `rollout list` shows it.
        id: String,
    },
    /// Send machines again after a pause or a halt.
    Resume {
        /// The rollout: id or id prefix, as `rollout list` shows it.
        id: String,
    },
    /// Stop for good, leaving every machine as it is.
    Abort {
        /// The rollout: id or id prefix, as `rollout list` shows it.
        id: String,
    },
    /// Open the approval gate of the next stage that has one.
    Approve {
        /// The rollout: id or id prefix, as `rollout list` shows it.
        id: String,
    },
    /// Revert the machines the rollout updated to the image each ran before.
    Rollback {
        /// The rollout: id or id prefix, as `rollout list` shows it.
        id: String,
    },
    /// Pause every pending or running rollout, in one call.
    StopAll,
}

#[derive(Debug, Serialize)]
struct StageView {
    name: String,
    selector: String,
    batch: String,
    bake_seconds: u64,
    approval: bool,
    approved: bool,
    max_unavailable_per_zone: Option<u32>,
    machines: u32,
    waves: u32,
    committed: u32,
    failed: u32,
    rolled_back: u32,
    in_flight: u32,
}

#[derive(Debug, Serialize)]
struct MachineView {
    machine_id: String,
    hostname: String,
    zone: String,
    stage: String,
    wave: u32,
    state: String,
    previous_image: String,
    turn_at: Option<String>,
    sent_at: Option<String>,
    committed_at: Option<String>,
    finished_at: Option<String>,
    /// Seconds from its turn to its final state.
    duration_seconds: Option<i64>,
    failure_reason: String,
}

#[derive(Debug, Serialize)]
struct RolloutView {
    id: String,
    image: String,
    digest: String,
    state: String,
    reason: String,
    created_at: String,
    created_by: String,
    updated_at: String,
    /// One-based wave in progress (or next) and the number of waves.
    wave: u32,
    waves: u32,
    waiting_for: String,
    machines: u32,
    failures: u32,
    max_failures: u32,
    on_failure: String,
    machine_deadline_seconds: u64,
    stages: Vec<StageView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    machine_states: Vec<MachineView>,
    #[serde(skip_serializing_if = "String::is_empty")]
    plan: String,
}

impl From<&RolloutInfo> for RolloutView {
    fn from(info: &RolloutInfo) -> Self {
        let stage_name = |index: u32| {
            info.stages
                .get(index as usize)
                .map(|stage| stage.name.clone())
                .unwrap_or_default()
        };
        RolloutView {
            id: info.id.clone(),
            image: info.image.clone(),
            digest: info.digest.clone(),
            state: info.state.clone(),
            reason: info.reason.clone(),
            created_at: format_time(info.created_at),
            created_by: info.created_by.clone(),
            updated_at: format_time(info.updated_at),
            wave: (info.current_wave + 1).min(info.wave_count),
            waves: info.wave_count,
            waiting_for: info.waiting_for.clone(),
            machines: info.machine_count,
            failures: info.failures,
            max_failures: info.max_failures,
            on_failure: info.on_failure.clone(),
            machine_deadline_seconds: info.machine_deadline_seconds,
            stages: info
                .stages
                .iter()
                .map(|stage| StageView {
                    name: stage.name.clone(),
                    selector: stage.selector.clone(),
                    batch: stage.batch.clone(),
                    bake_seconds: stage.bake_seconds,
                    approval: stage.approval,
                    approved: stage.approved,
                    max_unavailable_per_zone: (stage.max_unavailable_per_zone > 0)
                        .then_some(stage.max_unavailable_per_zone),
                    machines: stage.machines,
                    waves: stage.waves,
                    committed: stage.committed,
                    failed: stage.failed,
                    rolled_back: stage.rolled_back,
                    in_flight: stage.in_flight,
                })
                .collect(),
            machine_states: info
                .machines
                .iter()
                .map(|machine| MachineView {
                    machine_id: machine.machine_id.clone(),
                    hostname: machine.hostname.clone(),
                    zone: machine.zone.clone(),
                    stage: stage_name(machine.stage),
                    wave: machine.wave + 1,
                    state: machine.state.clone(),
                    previous_image: machine.previous_image.clone(),
                    turn_at: optional_time(machine.turn_at),
                    sent_at: optional_time(machine.sent_at),
                    committed_at: optional_time(machine.committed_at),
                    finished_at: optional_time(machine.finished_at),
                    duration_seconds: (machine.turn_at > 0 && machine.finished_at > 0)
                        .then(|| machine.finished_at - machine.turn_at),
                    failure_reason: machine.failure_reason.clone(),
                })
                .collect(),
            plan: info.plan_toml.clone(),
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

fn wave_rows(view: &RolloutView) -> Vec<Vec<String>> {
    view.machine_states
        .iter()
        .map(|machine| {
            vec![
                machine.wave.to_string(),
                machine.stage.clone(),
                machine.hostname.clone(),
                machine.zone.clone(),
                machine.state.clone(),
                machine.previous_image.clone(),
                machine
                    .duration_seconds
                    .map_or_else(String::new, |seconds| format!("{seconds}s")),
                machine.failure_reason.clone(),
            ]
        })
        .collect()
}

fn print_rollout(output: Output, info: &RolloutInfo, dry_run: bool) -> Result<(), CtlError> {
    let view = RolloutView::from(info);
    if output == Output::Json {
        return print_json(&view);
    }
    if dry_run {
        print_line!(
            "dry run: {} on {} machines in {} waves (nothing was changed)",
            view.image,
            view.machines,
            view.waves
        );
    } else {
        print_line!("rollout {}  {}  {}", view.id, view.image, view.state);
        print_line!(
            "created {} by {}; {}",
            view.created_at,
            view.created_by,
            view.reason
        );
        print_line!(
            "policy: max_failures {} ({} so far), machine_deadline {} s, on_failure {}",
            view.max_failures,
            view.failures,
            view.machine_deadline_seconds,
            view.on_failure
        );
        if !view.waiting_for.is_empty() {
            print_line!("waiting for {}", view.waiting_for);
        }
    }
    let stage_rows: Vec<Vec<String>> = view
        .stages
        .iter()
        .map(|stage| {
            vec![
                stage.name.clone(),
                stage.selector.clone(),
                stage.batch.clone(),
                format!("{}s", stage.bake_seconds),
                if stage.approval {
                    if stage.approved {
                        "approved"
                    } else {
                        "required"
                    }
                    .to_owned()
                } else {
                    "-".to_owned()
                },
                stage
                    .max_unavailable_per_zone
                    .map_or_else(|| "-".to_owned(), |limit| limit.to_string()),
                stage.machines.to_string(),
                stage.waves.to_string(),
                format!("{}/{}", stage.committed, stage.machines),
                stage.failed.to_string(),
            ]
        })
        .collect();
    print_line!();
    print_table(
        &[
            "STAGE",
            "SELECTOR",
            "BATCH",
            "BAKE",
            "APPROVAL",
            "MAX/ZONE",
            "MACHINES",
            "WAVES",
            "COMMITTED",
            "FAILED",
        ],
        &stage_rows,
    );
    print_line!();
    print_table(
        &[
            "WAVE", "STAGE", "MACHINE", "ZONE", "STATE", "PREVIOUS", "TOOK", "REASON",
        ],
        &wave_rows(&view),
    );
    Ok(())
}

async fn client(
    cli: &Cli,
) -> Result<
    (
        RolloutsClient<tonic::transport::Channel>,
        flotte_proto::transport::TlsDiagnostics,
    ),
    CtlError,
> {
    let (channel, diagnostics) = cli.connect().await?;
    Ok((RolloutsClient::new(channel), diagnostics))
}

/// Follows a rollout until it is final; success only if it succeeded.
async fn watch(cli: &Cli, id: &str) -> Result<(), CtlError> {
    let (mut rollouts, diagnostics) = client(cli).await?;
    let mut stream = rollouts
        .watch_rollout(RolloutRequest { id: id.to_owned() })
        .await
        .map_err(rpc_error(&diagnostics))?
        .into_inner();
    let mut live = (cli.output() == Output::Table && std::io::stdout().is_terminal())
        .then(|| LiveDisplay::new(ProgressDrawTarget::stdout()));
    let mut last: Option<RolloutInfo> = None;
    // Ctrl-C stops this watch, not the rollout: said as such, since a
    // progress bar vanishing can look like the rollout being cancelled. The
    // handler is installed here, before anything is shown.
    let mut interrupted = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|source| CtlError::Io {
            what: "cannot watch for Ctrl-C".into(),
            source,
        })?;
    loop {
        let info = tokio::select! {
            message = stream.message() => message.map_err(rpc_error(&diagnostics))?,
            _ = interrupted.recv() => {
                if let Some(live) = live.take() {
                    live.finish();
                }
                let state = last.as_ref().map_or("", |info| info.state.as_str());
                return Err(CtlError::Interrupted(format!(
                    "stopped watching; rollout {id} goes on{} (`flottectl rollout watch {id}` \
                     follows it again, `flottectl rollout pause {id}` pauses it)",
                    if state.is_empty() { String::new() } else { format!(", {state}") }
                )));
            }
        };
        let Some(info) = info else { break };
        let view = RolloutView::from(&info);
        match (&mut live, cli.output()) {
            (_, Output::Json) => print_json_line(&view)?,
            (Some(live), Output::Table) => live.show(&view),
            (None, Output::Table) => {
                for line in frame_lines(&view) {
                    print_line!("{line}");
                }
            }
        }
        last = Some(info);
    }
    if let Some(live) = live {
        live.finish();
    }
    let Some(last) = last else {
        return Err(CtlError::Rpc(format!(
            "the watch of rollout {id} ended without news"
        )));
    };
    if last.state == "succeeded" {
        Ok(())
    } else if matches!(last.state.as_str(), "failed" | "aborted" | "rolled_back") {
        Err(CtlError::Rpc(format!(
            "rollout {} ended {}: {}",
            short(&last.id),
            last.state,
            last.reason
        )))
    } else {
        Err(CtlError::Rpc(format!(
            "the watch of rollout {} ended while it was {}",
            short(&last.id),
            last.state
        )))
    }
}

/// The example plan, the same text as the repository's `examples/plan.toml`.
pub const EXAMPLE_PLAN: &str = include_str!("../../examples/plan.toml");

/// `rollout plan-init`: the example plan into `out` (refusing to replace a
/// file) or onto stdout.
fn plan_init(out: Option<&std::path::Path>) -> Result<(), CtlError> {
    let Some(path) = out else {
        print!("{EXAMPLE_PLAN}");
        return Ok(());
    };
    let io_error = |source| CtlError::Io {
        what: format!("cannot write {}", path.display()),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_error)?;
    std::io::Write::write_all(&mut file, EXAMPLE_PLAN.as_bytes()).map_err(io_error)?;
    note_line!(
        "wrote {}: edit the selectors, then `flottectl rollout create --image NAME@VERSION --plan {} --dry-run`",
        path.display(),
        path.display()
    );
    Ok(())
}

pub async fn run(cli: &Cli, command: &RolloutCommand) -> Result<(), CtlError> {
    match command {
        RolloutCommand::Watch { id } => return watch(cli, id).await,
        RolloutCommand::PlanInit { out } => return plan_init(out.as_deref()),
        _ => {}
    }
    let (mut rollouts, diagnostics) = client(cli).await?;
    let error = rpc_error(&diagnostics);
    let by_id = |id: &String| RolloutRequest { id: id.clone() };
    let info = match command {
        RolloutCommand::Create {
            image,
            plan,
            dry_run,
            force,
        } => {
            let plan_toml = read_file(plan)?;
            let response = rollouts
                .create_rollout(CreateRolloutRequest {
                    image: image.clone(),
                    plan_toml,
                    dry_run: *dry_run,
                    force: *force,
                })
                .await
                .map_err(error)?
                .into_inner();
            for warning in &response.warnings {
                output::note_message(&format!(
                    "flottectl: warning: {warning}{}",
                    if response.dry_run {
                        " (needs --force)"
                    } else {
                        " (started with --force)"
                    }
                ));
            }
            let info = response.rollout.unwrap_or_default();
            return print_rollout(cli.output(), &info, response.dry_run);
        }
        RolloutCommand::List | RolloutCommand::StopAll => {
            let listed = if matches!(command, RolloutCommand::List) {
                rollouts.list_rollouts(ListRolloutsRequest {}).await
            } else {
                rollouts.stop_all_rollouts(StopAllRolloutsRequest {}).await
            }
            .map_err(error)?
            .into_inner();
            let views: Vec<RolloutView> = listed.rollouts.iter().map(RolloutView::from).collect();
            if cli.output() == Output::Json {
                return print_json(&views);
            }
            if matches!(command, RolloutCommand::StopAll) {
                print_line!("paused {} rollout(s)", views.len());
            }
            let rows: Vec<Vec<String>> = views
                .iter()
                .map(|view| {
                    vec![
                        short(&view.id).to_owned(),
                        view.image.clone(),
                        view.state.clone(),
                        format!("{}/{}", view.wave, view.waves),
                        view.machines.to_string(),
                        format!("{}/{}", view.failures, view.max_failures),
                        view.created_at.clone(),
                        view.created_by.clone(),
                        view.reason.clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID", "IMAGE", "STATE", "WAVE", "MACHINES", "FAILURES", "CREATED", "BY",
                    "REASON",
                ],
                &rows,
            );
            return Ok(());
        }
        RolloutCommand::Show { id } => rollouts.get_rollout(by_id(id)).await,
        RolloutCommand::Pause { id } => rollouts.pause_rollout(by_id(id)).await,
        RolloutCommand::Resume { id } => rollouts.resume_rollout(by_id(id)).await,
        RolloutCommand::Abort { id } => rollouts.abort_rollout(by_id(id)).await,
        RolloutCommand::Approve { id } => rollouts.approve_rollout(by_id(id)).await,
        RolloutCommand::Rollback { id } => rollouts.rollback_rollout(by_id(id)).await,
        RolloutCommand::Watch { .. } | RolloutCommand::PlanInit { .. } => unreachable_watch(),
    }
    .map_err(error)?
    .into_inner();
    if matches!(command, RolloutCommand::Show { .. }) {
        return print_rollout(cli.output(), &info, false);
    }
    let view = RolloutView::from(&info);
    if cli.output() == Output::Json {
        return print_json(&view);
    }
    print_line!(
        "rollout {}  {}  {}: {}",
        view.id,
        view.image,
        view.state,
        view.reason
    );
    Ok(())
}

/// `watch` and `plan-init` are handled before a unary call is made.
fn unreachable_watch() -> Result<tonic::Response<RolloutInfo>, tonic::Status> {
    Err(tonic::Status::internal("not a unary call"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_init_writes_the_example_once_and_never_over_a_file() {
        let path =
            std::env::temp_dir().join(format!("flotte-plan-init-{}.toml", std::process::id()));
        let _ = std::fs::remove_file(&path);
        plan_init(Some(&path)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), EXAMPLE_PLAN);
        std::fs::write(&path, "mine").unwrap();
        let refused = plan_init(Some(&path)).unwrap_err();
        assert!(refused.to_string().contains("cannot write"), "{refused}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mine", "kept");
        std::fs::remove_file(&path).unwrap();
        assert!(EXAMPLE_PLAN.contains("[[stage]]") && EXAMPLE_PLAN.contains("[policy]"));
    }
}
