//! `flottectl machines quarantine | release | forensics`, `flottectl
//! remediation list`, and the remediation line of `flottectl status`: taking
//! sick machines out of service (kept for forensics) and what automatic
//! remediation did.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use clap::Subcommand;
use flotte_proto::v1::repair_client::RepairClient;
use flotte_proto::v1::{
    ForensicsDownloadChunk, GetForensicsRequest, ListRemediationsRequest, Quarantine,
    QuarantineMachineRequest, ReleaseMachineRequest, RemediationStatusRequest,
    RemediationStatusResponse,
};
use serde::Serialize;
use tonic::transport::Channel;

use crate::cli::{rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{format_time, print_json, print_line, print_list, Output};

/// The repair subcommands of `flottectl machines`.
#[derive(Debug, Clone, Subcommand)]
pub enum MachineRepairCommand {
    /// Take a machine out of service but keep it for investigation: its agent
    /// runs its on_quarantine hook and uploads a forensic bundle; nothing is wiped.
    Quarantine {
        /// The machine: id, id prefix or hostname.
        id: String,
        /// Why, kept with the quarantine and shown in listings and audit.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Put a quarantined machine back in service (its on_release hook runs).
    Release {
        /// The machine: id, id prefix or hostname.
        id: String,
    },
    /// Download a forensic bundle of the machine into DIR (the tar and its
    /// unpacked files): the latest one, or that of `--quarantine QID`; or
    /// `--list` every bundle kept for it (one per quarantine).
    Forensics {
        /// The machine: id, id prefix or hostname.
        id: String,
        /// The directory to write the bundle into.
        #[arg(long, required_unless_present = "list")]
        out: Option<PathBuf>,
        /// The quarantine whose bundle to download (default: the latest).
        #[arg(long, value_name = "QID")]
        quarantine: Option<String>,
        /// List the kept bundles instead of downloading one.
        #[arg(long, conflicts_with_all = ["out", "quarantine"])]
        list: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RemediationCommand {
    /// Remediation events, newest first.
    List,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QuarantineView {
    pub id: String,
    pub reason: String,
    pub since: String,
    pub by: String,
}

impl From<&Quarantine> for QuarantineView {
    fn from(quarantine: &Quarantine) -> Self {
        QuarantineView {
            id: quarantine.id.clone(),
            reason: quarantine.reason.clone(),
            since: format_time(quarantine.since),
            by: quarantine.by.clone(),
        }
    }
}

async fn repair_client(
    cli: &Cli,
) -> Result<(RepairClient<Channel>, impl Fn(tonic::Status) -> CtlError), CtlError> {
    let (channel, diagnostics) = cli.connect().await?;
    let rpc = move |status| rpc_error(&diagnostics)(status);
    Ok((RepairClient::new(channel), rpc))
}

pub async fn run_machine_repair(cli: &Cli, command: &MachineRepairCommand) -> Result<(), CtlError> {
    let (mut client, rpc) = repair_client(cli).await?;
    match command {
        MachineRepairCommand::Quarantine { id, reason } => {
            let info = client
                .quarantine_machine(QuarantineMachineRequest {
                    id: id.clone(),
                    reason: reason.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            let view = info.quarantine.as_ref().map(QuarantineView::from);
            if cli.output() == Output::Json {
                return print_json(&view);
            }
            if let Some(view) = view {
                print_line!(
                    "{} ({}) quarantined since {} by {}: {}",
                    info.hostname,
                    info.machine_id,
                    view.since,
                    view.by,
                    view.reason
                );
            }
        }
        MachineRepairCommand::Release { id } => {
            let info = client
                .release_machine(ReleaseMachineRequest { id: id.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            if cli.output() == Output::Json {
                return print_json(&serde_json::json!({
                    "machine_id": info.machine_id,
                    "hostname": info.hostname,
                    "quarantined": false,
                }));
            }
            print_line!(
                "{} ({}) released from quarantine",
                info.hostname,
                info.machine_id
            );
        }
        MachineRepairCommand::Forensics { id, list: true, .. } => {
            let bundles = list_forensics(&mut client, &rpc, id).await?;
            print_list(
                cli.output(),
                &bundles,
                &["QUARANTINE", "RECEIVED", "SIZE"],
                |bundle| {
                    vec![
                        bundle.quarantine_id.clone(),
                        bundle.received_at.clone(),
                        bundle.size.to_string(),
                    ]
                },
            )?;
        }
        MachineRepairCommand::Forensics {
            id,
            out,
            quarantine,
            list: false,
        } => {
            let out = out
                .as_deref()
                .ok_or_else(|| CtlError::Usage("--out DIR is required to download".into()))?;
            let written =
                download_forensics(&mut client, &rpc, id, quarantine.as_deref(), out).await?;
            if cli.output() == Output::Json {
                return print_json(&written);
            }
            print_line!(
                "forensic bundle of quarantine {} ({} bytes, sha256 {}) written to {} and unpacked in {}",
                written.quarantine_id,
                written.size,
                written.sha256,
                written.archive.display(),
                written.directory.display()
            );
        }
    }
    Ok(())
}

/// One kept bundle, as `--list` shows it.
#[derive(Debug, Serialize)]
struct KeptBundle {
    quarantine_id: String,
    received_at: String,
    size: u64,
}

/// Calls `GetForensics`; returns its first message (the header and the
/// list of kept bundles) and the rest of the stream.
async fn open_forensics(
    client: &mut RepairClient<Channel>,
    rpc: &impl Fn(tonic::Status) -> CtlError,
    request: GetForensicsRequest,
) -> Result<
    (
        ForensicsDownloadChunk,
        tonic::Streaming<ForensicsDownloadChunk>,
    ),
    CtlError,
> {
    let mut stream = client
        .get_forensics(request)
        .await
        .map_err(rpc)?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(rpc)?
        .ok_or_else(|| CtlError::Rpc("the server sent an empty answer".into()))?;
    Ok((first, stream))
}

async fn list_forensics(
    client: &mut RepairClient<Channel>,
    rpc: &impl Fn(tonic::Status) -> CtlError,
    id: &str,
) -> Result<Vec<KeptBundle>, CtlError> {
    let request = GetForensicsRequest {
        id: id.to_owned(),
        list_only: true,
        ..GetForensicsRequest::default()
    };
    let (listing, _) = open_forensics(client, rpc, request).await?;
    Ok(listing
        .bundles
        .into_iter()
        .map(|bundle| KeptBundle {
            quarantine_id: bundle.quarantine_id,
            received_at: format_time(bundle.received_at),
            size: bundle.size,
        })
        .collect())
}

#[derive(Debug, Serialize)]
struct DownloadedBundle {
    machine_id: String,
    quarantine_id: String,
    received_at: String,
    size: u64,
    sha256: String,
    archive: PathBuf,
    directory: PathBuf,
    files: Vec<String>,
}

async fn download_forensics(
    client: &mut RepairClient<Channel>,
    rpc: &impl Fn(tonic::Status) -> CtlError,
    id: &str,
    quarantine_id: Option<&str>,
    out: &Path,
) -> Result<DownloadedBundle, CtlError> {
    let request = GetForensicsRequest {
        id: id.to_owned(),
        quarantine_id: quarantine_id.unwrap_or_default().to_owned(),
        list_only: false,
    };
    let (header, mut stream) = open_forensics(client, rpc, request).await?;
    // The quarantine id names files below `out`, and the size bounds memory.
    if !flotte_proto::identity::is_valid_segment(&header.quarantine_id) {
        return Err(CtlError::Rpc(format!(
            "the server sent a bundle with an invalid quarantine id {}",
            flotte_proto::names::quoted_prefix(&header.quarantine_id)
        )));
    }
    let mut bytes = header.data.clone();
    while let Some(chunk) = stream.message().await.map_err(rpc)? {
        if (bytes.len() + chunk.data.len()) as u64 > header.size {
            return Err(CtlError::Rpc(format!(
                "the server sent more than the announced {} bytes",
                header.size
            )));
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    if sha256 != header.sha256 || bytes.len() as u64 != header.size {
        return Err(CtlError::Rpc(format!(
            "the bundle arrived damaged: {} bytes with sha256 {sha256}, expected {} bytes with {}",
            bytes.len(),
            header.size,
            header.sha256
        )));
    }
    let write_error = |path: &Path| {
        let path = path.to_owned();
        move |source| CtlError::ReadFile { path, source }
    };
    std::fs::create_dir_all(out).map_err(write_error(out))?;
    let stem = format!("forensics-{}", header.quarantine_id);
    let archive = out.join(format!("{stem}.tar"));
    std::fs::write(&archive, &bytes).map_err(write_error(&archive))?;
    let directory = out.join(&stem);
    let files = unpack_bundle(&bytes, &directory)?;
    Ok(DownloadedBundle {
        machine_id: header.machine_id,
        quarantine_id: header.quarantine_id,
        received_at: format_time(header.received_at),
        size: header.size,
        sha256,
        archive,
        directory,
        files,
    })
}

/// Unpacks the regular files of a bundle (it comes from a machine under
/// suspicion: links, devices and paths leaving `directory` are skipped).
fn unpack_bundle(bytes: &[u8], directory: &Path) -> Result<Vec<String>, CtlError> {
    let unpack_error =
        |error: std::io::Error| CtlError::Rpc(format!("cannot unpack the bundle: {error}"));
    let mut archive = tar::Archive::new(bytes);
    let mut files = Vec::new();
    for entry in archive.entries().map_err(unpack_error)? {
        let mut entry = entry.map_err(unpack_error)?;
        let path = entry.path().map_err(unpack_error)?.into_owned();
        let plain = path
            .components()
            .all(|component| matches!(component, Component::Normal(_)));
        if !plain || entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let target = directory.join(&path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(unpack_error)?;
        }
        let mut output = std::fs::File::create(&target).map_err(unpack_error)?;
        std::io::copy(&mut entry, &mut output).map_err(unpack_error)?;
        files.push(path.display().to_string());
    }
    Ok(files)
}

pub async fn run_remediation(cli: &Cli, command: &RemediationCommand) -> Result<(), CtlError> {
    let (mut client, rpc) = repair_client(cli).await?;
    match command {
        RemediationCommand::List => {
            let events = client
                .list_remediations(ListRemediationsRequest {})
                .await
                .map_err(&rpc)?
                .into_inner()
                .events;
            #[derive(Serialize)]
            struct Row {
                id: String,
                machine_id: String,
                hostname: String,
                zone: String,
                labels: BTreeMap<String, String>,
                provider: String,
                state: String,
                reason: String,
                opened_at: String,
                updated_at: String,
                replacement_machine_id: Option<String>,
                detail: String,
            }
            let rows: Vec<Row> = events
                .into_iter()
                .map(|event| Row {
                    id: event.id,
                    machine_id: event.machine_id,
                    hostname: event.hostname,
                    zone: event.zone,
                    labels: event.labels.into_iter().collect(),
                    provider: event.provider,
                    state: event.state,
                    reason: event.reason,
                    opened_at: format_time(event.opened_at),
                    updated_at: format_time(event.updated_at),
                    replacement_machine_id: (!event.replacement_machine_id.is_empty())
                        .then_some(event.replacement_machine_id),
                    detail: event.detail,
                })
                .collect();
            print_list(
                cli.output(),
                &rows,
                &[
                    "OPENED",
                    "MACHINE",
                    "ZONE",
                    "STATE",
                    "PROVIDER",
                    "REPLACEMENT",
                    "REASON",
                ],
                |row| {
                    vec![
                        row.opened_at.clone(),
                        row.hostname.clone(),
                        row.zone.clone(),
                        row.state.clone(),
                        row.provider.clone(),
                        row.replacement_machine_id.clone().unwrap_or_default(),
                        row.reason.clone(),
                    ]
                },
            )
        }
    }
}

/// The remediation part of `flottectl status`, as JSON.
#[derive(Debug, Serialize)]
pub struct RemediationStatusView {
    pub enabled: bool,
    pub breaker_enabled: bool,
    pub breaker_open: bool,
    pub breaker_reasons: Vec<String>,
    pub in_progress: u32,
    pub max_concurrent: u32,
}

pub async fn remediation_status(
    channel: Channel,
    rpc: &impl Fn(tonic::Status) -> CtlError,
) -> Result<RemediationStatusView, CtlError> {
    let status: RemediationStatusResponse = RepairClient::new(channel)
        .remediation_status(RemediationStatusRequest {})
        .await
        .map_err(rpc)?
        .into_inner();
    Ok(RemediationStatusView {
        enabled: status.enabled,
        breaker_enabled: status.breaker_enabled,
        breaker_open: status.breaker_open,
        breaker_reasons: status.breaker_reasons,
        in_progress: status.in_progress,
        max_concurrent: status.max_concurrent,
    })
}

/// One line (or a few) for people.
pub fn print_remediation_status(view: &RemediationStatusView) {
    if !view.enabled {
        // Without a rule the breaker is never evaluated: "closed" would mislead.
        print_line!();
        print_line!("remediation: off (no [[remediation.rule]] in the server settings)");
        return;
    }
    let breaker = match (view.breaker_enabled, view.breaker_open) {
        (false, _) => "off".to_owned(),
        (true, false) => "closed".to_owned(),
        (true, true) => "OPEN (automatic remediation stopped)".to_owned(),
    };
    print_line!();
    print_line!(
        "remediation: on, {} of at most {} in progress, breaker {breaker}",
        view.in_progress,
        view.max_concurrent
    );
    for reason in &view.breaker_reasons {
        print_line!("  breaker: {reason}");
    }
}
