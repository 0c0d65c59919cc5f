//! `flottectl machines verify | restore-image` and `flottectl drift report`:
//! asking machines to verify the image they run against its signed index,
//! waiting for their answers, and listing the drift found.

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Subcommand;
use flotte_proto::v1::image_integrity_client::ImageIntegrityClient;
use flotte_proto::v1::{
    ListVerificationsRequest, MachineVerification, RestoreImageRequest, VerifyImagesRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use crate::cli::{rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{format_time, note_line, print_fields, print_json, print_list, Output};

/// Between two looks at the answers while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Subcommand)]
pub enum MachineIntegrityCommand {
    /// Verify the running image against its signed file index now: TARGET
    /// is a machine id, id prefix, hostname, or a selector (`role=web`).
    /// Waits for every asked machine's answer; exits non-zero on drift.
    Verify {
        /// A machine id, id prefix, hostname, or a label selector.
        target: String,
        /// Give up waiting after this long (e.g. 10m).
        #[arg(long, default_value = "10m")]
        timeout: String,
    },
    /// Re-create a machine's image tree from the signed payload (the
    /// drifted tree is kept for forensics), then verify it; waits for the
    /// result.
    RestoreImage {
        /// The machine: id, id prefix or hostname.
        id: String,
        /// Give up waiting after this long (e.g. 10m).
        #[arg(long, default_value = "10m")]
        timeout: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DriftCommand {
    /// Machines whose last verification found drift (or could not be
    /// done), and what differs.
    Report {
        #[arg(long, default_value = "", value_parser = crate::cli::selector_argument, help = crate::cli::SELECTOR_HELP)]
        selector: String,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DifferenceView {
    pub path: String,
    pub kind: String,
    pub detail: String,
}

/// One machine's last verification, as shown and as `-o json` prints it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerificationView {
    pub machine_id: String,
    pub hostname: String,
    pub image: String,
    pub result: String,
    pub error: String,
    pub verified_at: String,
    pub duration_ms: u64,
    pub bytes_read: u64,
    pub files_checked: u64,
    pub changed: u64,
    pub added: u64,
    pub removed: u64,
    pub mode_changed: u64,
    pub link_retargeted: u64,
    pub differences: Vec<DifferenceView>,
    pub kept_tree: String,
    pub restore_message: String,
    #[serde(skip)]
    request_id: String,
}

impl VerificationView {
    fn differing(&self) -> u64 {
        self.changed + self.added + self.removed + self.mode_changed + self.link_retargeted
    }
}

impl From<&MachineVerification> for VerificationView {
    fn from(machine: &MachineVerification) -> Self {
        let verification = machine.verification.clone().unwrap_or_default();
        let image = verification.image.unwrap_or_default();
        VerificationView {
            machine_id: machine.machine_id.clone(),
            hostname: machine.hostname.clone(),
            image: format!("{}@{}", image.name, image.version),
            result: verification.result,
            error: verification.error,
            verified_at: format_time(verification.started_at),
            duration_ms: verification.duration_ms,
            bytes_read: verification.bytes_read,
            files_checked: verification.entries_checked,
            changed: verification.changed,
            added: verification.added,
            removed: verification.removed,
            mode_changed: verification.mode_changed,
            link_retargeted: verification.link_retargeted,
            differences: verification
                .differences
                .into_iter()
                .map(|difference| DifferenceView {
                    path: difference.path,
                    kind: difference.kind,
                    detail: difference.detail,
                })
                .collect(),
            kept_tree: verification.kept_tree,
            restore_message: verification.restore_message,
            request_id: verification.request_id,
        }
    }
}

async fn integrity_client(
    cli: &Cli,
) -> Result<
    (
        ImageIntegrityClient<Channel>,
        impl Fn(tonic::Status) -> CtlError,
    ),
    CtlError,
> {
    let (channel, diagnostics) = cli.connect().await?;
    let rpc = move |status| rpc_error(&diagnostics)(status);
    Ok((ImageIntegrityClient::new(channel), rpc))
}

fn parse_timeout(text: &str) -> Result<Duration, CtlError> {
    humantime::parse_duration(text)
        .map_err(|error| CtlError::Usage(format!("--timeout {text:?}: {error}")))
}

fn print_verifications(output: Output, views: &[VerificationView]) -> Result<(), CtlError> {
    print_list(
        output,
        views,
        &[
            "MACHINE",
            "HOSTNAME",
            "IMAGE",
            "RESULT",
            "DIFFERING",
            "READ",
            "TOOK",
            "AT",
        ],
        |view| {
            vec![
                view.machine_id.clone(),
                view.hostname.clone(),
                view.image.clone(),
                view.result.clone(),
                view.differing().to_string(),
                format!("{} MB", view.bytes_read / 1_000_000),
                format!("{} ms", view.duration_ms),
                view.verified_at.clone(),
            ]
        },
    )?;
    if output == Output::Table {
        for view in views {
            print_details(view);
        }
    }
    Ok(())
}

/// What differs on one machine (table output).
fn print_details(view: &VerificationView) {
    if !view.error.is_empty() {
        note_line!("{}: {}", view.hostname, view.error);
    }
    if !view.restore_message.is_empty() {
        note_line!("{}: {}", view.hostname, view.restore_message);
    }
    for difference in &view.differences {
        crate::output::print_line!(
            "  {} {:<7} {}  {}",
            view.hostname,
            difference.kind,
            difference.path,
            difference.detail
        );
    }
    let listed = view.differences.len() as u64;
    if view.differing() > listed {
        crate::output::print_line!(
            "  {} … and {} more differences",
            view.hostname,
            view.differing() - listed
        );
    }
}

/// The last verifications the filters choose.
async fn last_verifications(
    client: &mut ImageIntegrityClient<Channel>,
    rpc: &impl Fn(tonic::Status) -> CtlError,
    selector: &str,
    machine_ids: Vec<String>,
    drift_only: bool,
) -> Result<Vec<VerificationView>, CtlError> {
    Ok(client
        .list_verifications(ListVerificationsRequest {
            selector: selector.to_owned(),
            machine_ids,
            drift_only,
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .verifications
        .iter()
        .map(VerificationView::from)
        .collect())
}

/// Polls the answers to `request_id` from `machine_ids` until all came or
/// `timeout`; the answers in hand.
async fn wait_for_answers(
    client: &mut ImageIntegrityClient<Channel>,
    rpc: &impl Fn(tonic::Status) -> CtlError,
    request_id: &str,
    machine_ids: &BTreeSet<String>,
    timeout: Duration,
) -> Result<Vec<VerificationView>, CtlError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reported = usize::MAX;
    loop {
        let mut answered = last_verifications(
            client,
            rpc,
            "",
            machine_ids.iter().cloned().collect(),
            false,
        )
        .await?;
        answered.retain(|view| view.request_id == request_id);
        if answered.len() != reported {
            reported = answered.len();
            note_line!("verifying: {reported}/{} answered", machine_ids.len());
        }
        if answered.len() == machine_ids.len() || tokio::time::Instant::now() >= deadline {
            return Ok(answered);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The exit status of a wait: every machine answered, and none drifted.
fn verdict(asked: usize, answered: &[VerificationView]) -> Result<(), CtlError> {
    let drifted = answered
        .iter()
        .filter(|view| view.result != "clean")
        .count();
    match (answered.len() < asked, drifted) {
        (false, 0) => Ok(()),
        (missing, drifted) => Err(CtlError::Integrity(format!(
            "{drifted} machines with drift or errors{}",
            if missing {
                format!("; {} did not answer in time", asked - answered.len())
            } else {
                String::new()
            }
        ))),
    }
}

pub async fn run_machine_integrity(
    cli: &Cli,
    command: &MachineIntegrityCommand,
) -> Result<(), CtlError> {
    let (mut client, rpc) = integrity_client(cli).await?;
    match command {
        MachineIntegrityCommand::Verify { target, timeout } => {
            let timeout = parse_timeout(timeout)?;
            let asked = client
                .verify_images(VerifyImagesRequest {
                    target: target.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            let mut waiting = BTreeSet::new();
            for machine in &asked.machines {
                if machine.sent {
                    waiting.insert(machine.machine_id.clone());
                } else {
                    note_line!(
                        "{} ({}) is not connected (or its session queue is full): not asked",
                        machine.hostname,
                        machine.machine_id
                    );
                }
            }
            let answered =
                wait_for_answers(&mut client, &rpc, &asked.request_id, &waiting, timeout).await?;
            print_verifications(cli.output(), &answered)?;
            verdict(asked.machines.len(), &answered)
        }
        MachineIntegrityCommand::RestoreImage { id, timeout } => {
            let timeout = parse_timeout(timeout)?;
            let asked = client
                .restore_image(RestoreImageRequest {
                    machine: id.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            let waiting = BTreeSet::from([asked.machine_id.clone()]);
            let answered =
                wait_for_answers(&mut client, &rpc, &asked.request_id, &waiting, timeout).await?;
            print_verifications(cli.output(), &answered)?;
            verdict(1, &answered)
        }
    }
}

pub async fn run_drift(cli: &Cli, command: &DriftCommand) -> Result<(), CtlError> {
    let (mut client, rpc) = integrity_client(cli).await?;
    match command {
        DriftCommand::Report { selector } => {
            let views = last_verifications(&mut client, &rpc, selector, Vec::new(), true).await?;
            if views.is_empty() && cli.output() == Output::Table {
                note_line!("no machine's last verification found drift");
            }
            print_verifications(cli.output(), &views)
        }
    }
}

/// The last verification of one machine, for `machines show` (nothing when
/// it was never verified).
pub async fn print_last_verification(cli: &Cli, machine_id: &str) -> Result<(), CtlError> {
    let (mut client, rpc) = integrity_client(cli).await?;
    let last =
        last_verifications(&mut client, &rpc, "", vec![machine_id.to_owned()], false).await?;
    let Some(view) = last.into_iter().next() else {
        crate::output::print_line!("last verification: never");
        return Ok(());
    };
    if cli.output() == Output::Json {
        return print_json(&view);
    }
    print_fields(
        20,
        &[
            ("last verification", view.verified_at.clone()),
            (
                "  result",
                format!("{} ({} differing)", view.result, view.differing()),
            ),
            ("  image", view.image.clone()),
            ("  duration", format!("{} ms", view.duration_ms)),
            ("  bytes read", view.bytes_read.to_string()),
        ],
    );
    print_details(&view);
    Ok(())
}
