//! `flottectl`, the admin CLI: argument parsing, one gRPC call per command,
//! and rendering as a table (people) or JSON (scripts, `-o json`).
//!
//! It holds no logic the server does not also enforce: validation here only
//! produces earlier, clearer errors.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use flotte_proto::labels::{format_labels, parse_labels};
use flotte_proto::transport::{
    channel_with_diagnostics, client_config, explain_status_with, TlsDiagnostics,
};
use flotte_proto::v1::machines_client::MachinesClient;
use flotte_proto::v1::tokens_client::TokensClient;
use flotte_proto::v1::{
    CheckResult, CreateTokenRequest, DecommissionMachineRequest, FleetStatusRequest,
    FleetStatusResponse, GetMachineRequest, GroupStatus, ListMachinesRequest, ListTokensRequest,
    Machine, MachineEvent, RevokeTokenRequest, SetLabelsRequest, SystemMetrics, TokenInfo,
    WatchMachinesRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use crate::profile::Profile;
use crate::roles::Role;

mod access;
mod governance;
mod images;
mod repair;
mod rollouts;

use governance::{run_audit, run_operator};

#[derive(Debug, Parser)]
#[command(name = "flottectl", version, about = "Flotte admin CLI")]
pub struct Cli {
    /// Operator profile directory (ca.pem, cert.pem, key.pem, profile.toml).
    #[arg(long, env = "FLOTTE_PROFILE", global = true)]
    profile: Option<PathBuf>,
    /// Server address (host:port), overriding the profile's.
    #[arg(long, env = "FLOTTE_SERVER", global = true)]
    server: Option<String>,
    /// Output format.
    /// Output format: table or json. (`image build -o FILE` also takes the
    /// image file here, as `flottectl image build … -o app-1.2.0.flotte`.)
    #[arg(short = 'o', long = "output", default_value = "table", global = true)]
    output_flag: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join tokens for enrolling machines.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled machines.
    #[command(subcommand, alias = "machine")]
    Machines(MachinesCommand),
    /// Machines per state, per zone and per value of a label.
    Status {
        /// Label whose values to group by, e.g. role.
        #[arg(long, default_value = "")]
        by: String,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Operators (people and CI jobs) and their roles.
    #[command(subcommand, alias = "operators")]
    Operator(OperatorCommand),
    /// Images (for now: the release keys trusted to sign them).
    #[command(subcommand)]
    Image(ImageCommand),
    /// The hash-chained audit log of every mutating call.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Disaster recovery: zone-loss impact and single points of failure.
    #[command(subcommand)]
    Dr(repair::DrCommand),
    /// Automatic remediation events.
    #[command(subcommand)]
    Remediation(repair::RemediationCommand),
    /// Staged rollouts of an image: qualification → canary → waves.
    #[command(subcommand, alias = "rollouts")]
    Rollout(rollouts::RolloutCommand),
    /// People who log into machines over SSH, and their keys.
    #[command(subcommand, alias = "users")]
    User(access::UserCommand),
    /// SSH access grants, propagation status and the who-has-access report.
    #[command(subcommand)]
    Access(access::AccessCommand),
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Create an operator and write a ready profile directory for them. The
    /// private key is generated here (or by the operator, with --csr) and
    /// never sent to the server.
    Create {
        name: String,
        #[arg(long)]
        role: Role,
        /// Profile directory to write (default: ./<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A CSR made on the operator's own machine: the profile is written
        /// without key.pem, which the operator adds.
        #[arg(long)]
        csr: Option<PathBuf>,
    },
    /// List operators and their roles.
    List,
    /// Change an operator's role (takes effect on their next call).
    SetRole { name: String, role: Role },
    /// Revoke an operator: every certificate refused and every connection
    /// closed at once. The name is never reused.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Release public keys (ed25519) trusted to sign images.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Make a release key pair: DIR/release.key (secret, 0600) and DIR/release.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Pack and sign a directory as an image file.
    Build {
        directory: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// Private release key (from `image keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Output file, e.g. app-1.2.0.flotte (also accepted as `-o FILE`).
        #[arg(long = "out")]
        out: Option<PathBuf>,
        /// Service command, words separated by spaces; a relative program
        /// path is taken inside the image (e.g. "bin/app --port 8080").
        #[arg(long)]
        service: Option<String>,
        /// TOML file with `[[check]]` tables declared by the image.
        #[arg(long)]
        checks: Option<PathBuf>,
    },
    /// Upload an image file (its signature must verify on the server).
    Push { file: PathBuf },
    /// List pushed images.
    List {
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Show one image: name@version.
    Show { reference: String },
}

#[derive(Debug, Subcommand)]
enum TrustCommand {
    /// Trust a release key: an `ssh-ed25519 AAAA…` line (a .pub file), or
    /// the raw 32-byte public key in base64 or hex.
    Add {
        key_file: PathBuf,
        /// Name shown in listings (default: the key's comment).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Stop trusting a release key (by id, id prefix or name).
    Remove { key: String },
    /// List trusted release keys.
    List,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// List audit entries, oldest first.
    List {
        /// Only entries since this time: RFC 3339 (2025-01-31T12:00:00Z) or
        /// a duration ago (1h, 7days).
        #[arg(long)]
        since: Option<String>,
        /// Only entries by this operator name.
        #[arg(long)]
        actor: Option<String>,
    },
    /// Check the whole hash chain here, on this machine; exits non-zero and
    /// names the first broken entry if the log was changed.
    Verify,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a join token; prints the secret token once.
    Create(TokenCreate),
    /// List join tokens (never their secrets).
    List,
    /// Revoke a join token by id.
    Revoke { id: String },
}

#[derive(Debug, Args)]
struct TokenCreate {
    /// Labels given to machines enrolling with this token: k=v,k2=v2.
    #[arg(long, default_value = "")]
    labels: String,
    /// Zone (datacenter) of machines enrolling with this token.
    #[arg(long)]
    zone: String,
    /// Lifetime, e.g. 1h, 30m.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Number of enrollments allowed.
    #[arg(long, default_value_t = 1)]
    uses: u32,
}

#[derive(Debug, Subcommand)]
enum MachinesCommand {
    /// List machines, optionally filtered by a label selector.
    List {
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Show one machine by id, id prefix or hostname.
    Show { id: String },
    /// Stream state changes as they happen (first the current states).
    Watch {
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Change a machine's labels (pushed to its agent at once).
    Label {
        id: String,
        /// Labels to add or change: k=v,k2=v2.
        #[arg(long, default_value = "")]
        set: String,
        /// Label keys to remove: k,k2.
        #[arg(long, default_value = "")]
        remove: String,
    },
    /// Retire a machine for good: its certificates are revoked, its session
    /// closed, and it can never reconnect.
    Decommission { id: String },
    /// Set the image a machine must run (name@version).
    SetImage {
        id: String,
        reference: String,
        /// Allow going to a lower version than the machine runs.
        #[arg(long)]
        rollback: bool,
    },
    #[command(flatten)]
    Repair(repair::MachineRepairCommand),
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("no profile: pass --profile DIR or set FLOTTE_PROFILE")]
    NoProfile,
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
    #[error(transparent)]
    Transport(#[from] flotte_proto::transport::TransportError),
    #[error("{0}")]
    Usage(String),
    /// A failed RPC, already explained (see `transport::explain_status_with`).
    #[error("{0}")]
    Rpc(String),
    #[error("cannot encode output: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate the operator's key: {0}")]
    Key(#[from] crate::ca::CaError),
    /// The audit log failed verification (already explained).
    #[error("{0}")]
    AuditBroken(String),
}

impl CtlError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CtlError::Usage(_) | CtlError::NoProfile => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

/// The server address this invocation dials: `--server`, else the profile's.
fn server_address(cli: &Cli, profile: &Profile) -> String {
    cli.server
        .clone()
        .unwrap_or_else(|| profile.settings.server.clone())
}

fn load_profile(cli: &Cli) -> Result<Profile, CtlError> {
    let directory = cli.profile.as_ref().ok_or(CtlError::NoProfile)?;
    Ok(Profile::load(directory)?)
}

impl Cli {
    /// The output format; anything but `json` renders tables (the value was
    /// checked by [`Cli::check_output_flag`] before any command ran).
    fn output(&self) -> Output {
        if self.output_flag == "json" {
            Output::Json
        } else {
            Output::Table
        }
    }

    /// `-o` must name a format, except for `image build`, where it may name
    /// the image file.
    fn check_output_flag(&self) -> Result<(), CtlError> {
        let is_format = matches!(self.output_flag.as_str(), "table" | "json");
        let is_build = matches!(self.command, Command::Image(ImageCommand::Build { .. }));
        if is_format || is_build {
            Ok(())
        } else {
            Err(CtlError::Usage(format!(
                "-o {:?}: expected table or json",
                self.output_flag
            )))
        }
    }
}

fn connect(cli: &Cli) -> Result<(Channel, TlsDiagnostics), CtlError> {
    let profile = load_profile(cli)?;
    let tls = client_config(
        &profile.ca_pem,
        Some((&profile.certificate_pem, &profile.key_pem)),
    )?;
    Ok(channel_with_diagnostics(
        &server_address(cli, &profile),
        Arc::new(tls),
    )?)
}

fn read_file(path: &std::path::Path) -> Result<String, CtlError> {
    std::fs::read_to_string(path).map_err(|source| CtlError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

/// Turns a failed RPC into an error naming its real cause.
fn rpc_error(diagnostics: &TlsDiagnostics) -> impl Fn(tonic::Status) -> CtlError + '_ {
    move |status| CtlError::Rpc(explain_status_with(&status, diagnostics))
}

pub fn format_time(unix: i64) -> String {
    if unix <= 0 {
        return "never".to_owned();
    }
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs());
    humantime::format_rfc3339_seconds(time).to_string()
}

fn optional_time(unix: i64) -> Option<String> {
    (unix > 0).then(|| format_time(unix))
}

#[derive(Debug, Serialize)]
struct TokenView {
    id: String,
    labels: std::collections::BTreeMap<String, String>,
    zone: String,
    created_at: String,
    expires_at: String,
    uses_allowed: u32,
    uses_done: u32,
    revoked: bool,
}

impl From<&TokenInfo> for TokenView {
    fn from(info: &TokenInfo) -> Self {
        TokenView {
            id: info.id.clone(),
            labels: info.labels.clone().into_iter().collect(),
            zone: info.zone.clone(),
            created_at: format_time(info.created_at),
            expires_at: format_time(info.expires_at),
            uses_allowed: info.uses_allowed,
            uses_done: info.uses_done,
            revoked: info.revoked,
        }
    }
}

#[derive(Debug, Serialize)]
struct MachineView {
    id: String,
    hostname: String,
    zone: String,
    labels: std::collections::BTreeMap<String, String>,
    connected: bool,
    last_seen: Option<String>,
    agent_version: String,
    certificate_expires_at: Option<String>,
    os: String,
    kernel: String,
    arch: String,
    boot_time: Option<String>,
    enrolled_at: Option<String>,
    identity: String,
    remote_address: Option<String>,
    desired_version: u64,
    applied_desired_version: u64,
    retired_at: Option<String>,
    state: String,
    state_reason: String,
    state_since: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checks: Vec<CheckView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<MetricsView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    metric_breaches: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    transitions: Vec<TransitionView>,
    /// `name@version` the machine runs, ran before, and must run.
    current_image: Option<String>,
    previous_image: Option<String>,
    desired_image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_swap: Option<SwapView>,
    /// Set while quarantined (kept for investigation, out of service).
    quarantine: Option<repair::QuarantineView>,
}

#[derive(Debug, Serialize)]
struct SwapView {
    target: Option<String>,
    step: String,
    outcome: String,
    message: String,
    bytes_downloaded: u64,
    updated_at: Option<String>,
}

fn image_name(image: Option<&flotte_proto::v1::ImageRef>) -> Option<String> {
    image
        .filter(|image| !image.name.is_empty())
        .map(|image| format!("{}@{}", image.name, image.version))
}

#[derive(Debug, Serialize)]
struct CheckView {
    name: String,
    kind: String,
    target: String,
    critical: bool,
    healthy: bool,
    last_passed: bool,
    last_output: String,
    last_run_at: Option<String>,
    last_duration_ms: u32,
    consecutive: u32,
}

impl From<&CheckResult> for CheckView {
    fn from(check: &CheckResult) -> Self {
        CheckView {
            name: check.name.clone(),
            kind: check.kind.clone(),
            target: check.target.clone(),
            critical: check.critical,
            healthy: check.healthy,
            last_passed: check.last_passed,
            last_output: check.last_output.clone(),
            last_run_at: optional_time(check.last_run_at),
            last_duration_ms: check.last_duration_ms,
            consecutive: check.consecutive,
        }
    }
}

#[derive(Debug, Serialize)]
struct DiskView {
    mount: String,
    total_bytes: u64,
    used_bytes: u64,
    available_bytes: u64,
    used_percent: f64,
}

#[derive(Debug, Serialize)]
struct MetricsView {
    disks: Vec<DiskView>,
    memory_total_bytes: u64,
    memory_available_bytes: u64,
    load1: f64,
    load5: f64,
    load15: f64,
    uptime_seconds: u64,
}

impl From<&SystemMetrics> for MetricsView {
    fn from(metrics: &SystemMetrics) -> Self {
        MetricsView {
            disks: metrics
                .disks
                .iter()
                .map(|disk| DiskView {
                    mount: disk.mount.clone(),
                    total_bytes: disk.total_bytes,
                    used_bytes: disk.used_bytes,
                    available_bytes: disk.available_bytes,
                    used_percent: if disk.total_bytes == 0 {
                        0.0
                    } else {
                        disk.used_bytes as f64 * 100.0 / disk.total_bytes as f64
                    },
                })
                .collect(),
            memory_total_bytes: metrics.memory_total_bytes,
            memory_available_bytes: metrics.memory_available_bytes,
            load1: metrics.load1,
            load5: metrics.load5,
            load15: metrics.load15,
            uptime_seconds: metrics.uptime_seconds,
        }
    }
}

#[derive(Debug, Serialize)]
struct TransitionView {
    at: String,
    from: String,
    to: String,
    reason: String,
}

impl From<&flotte_proto::v1::StateTransition> for TransitionView {
    fn from(transition: &flotte_proto::v1::StateTransition) -> Self {
        TransitionView {
            at: format_time(transition.at),
            from: transition.from.clone(),
            to: transition.to.clone(),
            reason: transition.reason.clone(),
        }
    }
}

impl From<&Machine> for MachineView {
    fn from(machine: &Machine) -> Self {
        MachineView {
            id: machine.id.clone(),
            hostname: machine.hostname.clone(),
            zone: machine.zone.clone(),
            labels: machine.labels.clone().into_iter().collect(),
            connected: machine.connected,
            last_seen: optional_time(machine.last_seen),
            agent_version: machine.agent_version.clone(),
            certificate_expires_at: optional_time(machine.certificate_not_after),
            os: machine.os.clone(),
            kernel: machine.kernel.clone(),
            arch: machine.arch.clone(),
            boot_time: optional_time(machine.boot_time),
            enrolled_at: optional_time(machine.enrolled_at),
            identity: machine.identity_uri.clone(),
            remote_address: (!machine.remote_address.is_empty())
                .then(|| machine.remote_address.clone()),
            desired_version: machine.desired_version,
            applied_desired_version: machine.applied_desired_version,
            retired_at: optional_time(machine.retired_at),
            state: machine.state.clone(),
            state_reason: machine.state_reason.clone(),
            state_since: optional_time(machine.state_since),
            checks: machine.checks.iter().map(CheckView::from).collect(),
            metrics: machine.metrics.as_ref().map(MetricsView::from),
            metric_breaches: machine.metric_breaches.clone(),
            transitions: machine
                .transitions
                .iter()
                .map(TransitionView::from)
                .collect(),
            current_image: image_name(
                machine
                    .image
                    .as_ref()
                    .and_then(|image| image.current.as_ref()),
            ),
            previous_image: image_name(
                machine
                    .image
                    .as_ref()
                    .and_then(|image| image.previous.as_ref()),
            ),
            desired_image: image_name(machine.desired_image.as_ref()),
            last_swap: machine
                .image
                .as_ref()
                .and_then(|image| image.swap.as_ref())
                .map(|swap| SwapView {
                    target: image_name(swap.target.as_ref()),
                    step: swap.step.clone(),
                    outcome: swap.outcome.clone(),
                    message: swap.message.clone(),
                    bytes_downloaded: swap.bytes_downloaded,
                    updated_at: optional_time(swap.updated_at),
                }),
            quarantine: machine
                .quarantine
                .as_ref()
                .map(repair::QuarantineView::from),
        }
    }
}

/// Renders rows as an aligned text table.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn print_json<T: Serialize>(value: &T) -> Result<(), CtlError> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_tokens(output: Output, tokens: &[TokenInfo]) -> Result<(), CtlError> {
    let views: Vec<TokenView> = tokens.iter().map(TokenView::from).collect();
    if output == Output::Json {
        return print_json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|token| {
            vec![
                token.id.clone(),
                token.zone.clone(),
                format_labels(&token.labels),
                format!("{}/{}", token.uses_done, token.uses_allowed),
                token.expires_at.clone(),
                if token.revoked { "revoked" } else { "" }.to_owned(),
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(&["ID", "ZONE", "LABELS", "USES", "EXPIRES", "STATE"], &rows)
    );
    Ok(())
}

async fn run_token(cli: &Cli, command: &TokenCommand) -> Result<(), CtlError> {
    if let TokenCommand::Create(create) = command {
        // Check locally first so that a typo never needs a round trip.
        parse_labels(&create.labels)
            .map_err(|error| CtlError::Usage(format!("--labels: {error}")))?;
        humantime::parse_duration(&create.ttl)
            .map_err(|error| CtlError::Usage(format!("--ttl {:?}: {error}", create.ttl)))?;
    }
    let (channel, diagnostics) = connect(cli)?;
    let rpc = rpc_error(&diagnostics);
    let mut client = TokensClient::new(channel);
    match command {
        TokenCommand::Create(create) => {
            let labels = parse_labels(&create.labels)
                .map_err(|error| CtlError::Usage(format!("--labels: {error}")))?;
            let ttl = humantime::parse_duration(&create.ttl)
                .map_err(|error| CtlError::Usage(format!("--ttl {:?}: {error}", create.ttl)))?;
            let response = client
                .create_token(CreateTokenRequest {
                    labels: labels.into_iter().collect(),
                    zone: create.zone.clone(),
                    ttl_seconds: ttl.as_secs(),
                    uses: create.uses,
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            let info = response.info.unwrap_or_default();
            if cli.output() == Output::Json {
                #[derive(Serialize)]
                struct Created {
                    token: String,
                    #[serde(flatten)]
                    info: TokenView,
                }
                print_json(&Created {
                    token: response.token,
                    info: TokenView::from(&info),
                })?;
            } else {
                println!("{}", response.token);
                eprintln!(
                    "token {} for zone {} expires {} ({} use(s))",
                    info.id,
                    info.zone,
                    format_time(info.expires_at),
                    info.uses_allowed
                );
            }
        }
        TokenCommand::List => {
            let tokens = client
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(&rpc)?
                .into_inner()
                .tokens;
            print_tokens(cli.output(), &tokens)?;
        }
        TokenCommand::Revoke { id } => {
            let response = client
                .revoke_token(RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_tokens(cli.output(), &[response.info.unwrap_or_default()])?;
        }
    }
    Ok(())
}

fn machine_rows(machines: &[MachineView]) -> Vec<Vec<String>> {
    machines
        .iter()
        .map(|machine| {
            vec![
                machine.id.clone(),
                machine.hostname.clone(),
                machine.zone.clone(),
                match &machine.quarantine {
                    Some(_) => format!("{} [quarantined]", machine.state),
                    None => machine.state.clone(),
                },
                format_labels(&machine.labels),
                match (machine.retired_at.is_some(), machine.connected) {
                    (true, _) => "retired",
                    (false, true) => "yes",
                    (false, false) => "no",
                }
                .to_owned(),
                machine.last_seen.clone().unwrap_or_else(|| "never".into()),
                machine.agent_version.clone(),
            ]
        })
        .collect()
}

async fn run_machines(cli: &Cli, command: &MachinesCommand) -> Result<(), CtlError> {
    if let MachinesCommand::Repair(command) = command {
        return repair::run_machine_repair(cli, command).await;
    }
    let (channel, diagnostics) = connect(cli)?;
    let rpc = rpc_error(&diagnostics);
    let mut client = MachinesClient::new(channel);
    match command {
        MachinesCommand::List { selector } => {
            let machines = client
                .list_machines(ListMachinesRequest {
                    selector: selector.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner()
                .machines;
            let views: Vec<MachineView> = machines.iter().map(MachineView::from).collect();
            if cli.output() == Output::Json {
                return print_json(&views);
            }
            print!(
                "{}",
                render_table(
                    &[
                        "ID",
                        "HOSTNAME",
                        "ZONE",
                        "STATE",
                        "LABELS",
                        "CONNECTED",
                        "LAST SEEN",
                        "AGENT"
                    ],
                    &machine_rows(&views)
                )
            );
        }
        MachinesCommand::Show { id } => {
            let machine = client
                .get_machine(GetMachineRequest { id: id.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_machine(cli.output(), &machine)?;
        }
        MachinesCommand::Watch { selector } => {
            let mut events = client
                .watch(WatchMachinesRequest {
                    selector: selector.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            while let Some(event) = events.message().await.map_err(&rpc)? {
                print_event(cli.output(), &event)?;
            }
            return Err(CtlError::Rpc("the server ended the watch".into()));
        }
        MachinesCommand::Decommission { id } => {
            let machine = client
                .decommission_machine(DecommissionMachineRequest { id: id.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            if cli.output() != Output::Json {
                eprintln!(
                    "machine {} ({}) decommissioned: its certificates are revoked and it cannot reconnect",
                    machine.id, machine.hostname
                );
            }
            print_machine(cli.output(), &machine)?;
        }
        MachinesCommand::SetImage {
            id,
            reference,
            rollback,
        } => {
            let machine = client
                .set_image(flotte_proto::v1::SetImageRequest {
                    id: id.clone(),
                    reference: reference.clone(),
                    rollback: *rollback,
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_machine(cli.output(), &machine)?;
        }
        MachinesCommand::Repair(_) => {}
        MachinesCommand::Label { id, set, remove } => {
            let set =
                parse_labels(set).map_err(|error| CtlError::Usage(format!("--set: {error}")))?;
            let remove: Vec<String> = remove
                .split(',')
                .map(str::trim)
                .filter(|key| !key.is_empty())
                .map(str::to_owned)
                .collect();
            if set.is_empty() && remove.is_empty() {
                return Err(CtlError::Usage("give --set and/or --remove".into()));
            }
            let machine = client
                .set_labels(SetLabelsRequest {
                    id: id.clone(),
                    set: set.into_iter().collect(),
                    remove,
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_machine(cli.output(), &machine)?;
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct EventView {
    machine_id: String,
    hostname: String,
    zone: String,
    labels: std::collections::BTreeMap<String, String>,
    at: String,
    from: Option<String>,
    to: String,
    reason: String,
    snapshot: bool,
}

fn print_event(output: Output, event: &MachineEvent) -> Result<(), CtlError> {
    let transition = event.transition.clone().unwrap_or_default();
    let view = EventView {
        machine_id: event.machine_id.clone(),
        hostname: event.hostname.clone(),
        zone: event.zone.clone(),
        labels: event.labels.clone().into_iter().collect(),
        at: format_time(transition.at),
        from: (!transition.from.is_empty()).then(|| transition.from.clone()),
        to: transition.to.clone(),
        reason: transition.reason.clone(),
        snapshot: event.snapshot,
    };
    if output == Output::Json {
        // One object per line, so that scripts can read the stream as it comes.
        println!("{}", serde_json::to_string(&view)?);
    } else {
        let change = match &view.from {
            Some(from) => format!("{from} -> {}", view.to),
            None => format!("is {}", view.to),
        };
        println!(
            "{}  {:<16} {:<8} {:<28} {}",
            view.at, view.hostname, view.zone, change, view.reason
        );
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    Ok(())
}

#[derive(Debug, Serialize)]
struct GroupView {
    name: String,
    machines: u32,
    states: std::collections::BTreeMap<String, u32>,
}

impl From<&GroupStatus> for GroupView {
    fn from(group: &GroupStatus) -> Self {
        GroupView {
            name: group.name.clone(),
            machines: group.machines,
            states: group
                .states
                .iter()
                .map(|count| (count.state.clone(), count.machines))
                .collect(),
        }
    }
}

fn print_status(
    output: Output,
    status: &FleetStatusResponse,
    remediation: &repair::RemediationStatusView,
) -> Result<(), CtlError> {
    let fleet = status.fleet.as_ref().map(GroupView::from);
    let zones: Vec<GroupView> = status.zones.iter().map(GroupView::from).collect();
    let groups: Vec<GroupView> = status.groups.iter().map(GroupView::from).collect();
    if output == Output::Json {
        #[derive(Serialize)]
        struct StatusView<'a> {
            fleet: Option<GroupView>,
            zones: Vec<GroupView>,
            by: &'a str,
            groups: Vec<GroupView>,
            remediation: &'a repair::RemediationStatusView,
        }
        return print_json(&StatusView {
            fleet,
            zones,
            by: &status.by,
            groups,
            remediation,
        });
    }
    let states = ["operational", "degraded", "down", "unreachable", "unknown"];
    let row = |group: &GroupView| {
        let mut cells = vec![group.name.clone(), group.machines.to_string()];
        cells.extend(
            states
                .iter()
                .map(|state| group.states.get(*state).copied().unwrap_or(0).to_string()),
        );
        cells
    };
    let mut headers = vec!["GROUP", "MACHINES"];
    headers.extend(states.iter().copied());
    let mut rows: Vec<Vec<String>> = fleet.iter().map(row).collect();
    rows.extend(zones.iter().map(|zone| {
        let mut cells = row(zone);
        cells[0] = format!("zone={}", zone.name);
        cells
    }));
    rows.extend(groups.iter().map(|group| {
        let mut cells = row(group);
        cells[0] = format!("{}={}", status.by, group.name);
        cells
    }));
    print!("{}", render_table(&headers, &rows));
    repair::print_remediation_status(remediation);
    Ok(())
}

fn print_machine(output: Output, machine: &Machine) -> Result<(), CtlError> {
    let view = MachineView::from(machine);
    if output == Output::Json {
        return print_json(&view);
    }
    let never = || "never".to_owned();
    let fields = [
        ("id", view.id.clone()),
        ("identity", view.identity.clone()),
        ("hostname", view.hostname.clone()),
        ("zone", view.zone.clone()),
        ("labels", format_labels(&view.labels)),
        ("connected", view.connected.to_string()),
        (
            "remote address",
            view.remote_address.clone().unwrap_or_default(),
        ),
        ("last seen", view.last_seen.clone().unwrap_or_else(never)),
        ("agent version", view.agent_version.clone()),
        ("os", view.os.clone()),
        ("kernel", view.kernel.clone()),
        ("arch", view.arch.clone()),
        ("boot time", view.boot_time.clone().unwrap_or_else(never)),
        (
            "enrolled at",
            view.enrolled_at.clone().unwrap_or_else(never),
        ),
        (
            "certificate expires",
            view.certificate_expires_at.clone().unwrap_or_else(never),
        ),
        (
            "desired state",
            format!(
                "version {} (agent applied {})",
                view.desired_version, view.applied_desired_version
            ),
        ),
        (
            "decommissioned",
            view.retired_at.clone().unwrap_or_else(|| "no".to_owned()),
        ),
        (
            "quarantined",
            view.quarantine.as_ref().map_or_else(
                || "no".to_owned(),
                |quarantine| {
                    format!(
                        "since {} by {}: {}",
                        quarantine.since, quarantine.by, quarantine.reason
                    )
                },
            ),
        ),
    ];
    for (name, value) in fields {
        println!("{:<20} {value}", format!("{name}:"));
    }
    print_health_sections(&view);
    let none = || "none".to_owned();
    println!("\nimages:");
    println!(
        "  current            {}",
        view.current_image.clone().unwrap_or_else(none)
    );
    println!(
        "  previous           {}",
        view.previous_image.clone().unwrap_or_else(none)
    );
    println!(
        "  desired            {}",
        view.desired_image.clone().unwrap_or_else(none)
    );
    if let Some(swap) = &view.last_swap {
        println!(
            "  last swap          {} {} ({}): {}",
            swap.target.clone().unwrap_or_default(),
            swap.outcome,
            swap.step,
            swap.message
        );
    }
    Ok(())
}

/// State, checks, metrics and history of `machines show`.
fn print_health_sections(view: &MachineView) {
    println!(
        "{:<20} {} since {} ({})",
        "state:",
        view.state,
        view.state_since.clone().unwrap_or_else(|| "never".into()),
        view.state_reason
    );
    if !view.checks.is_empty() {
        println!("\nchecks:");
        let rows: Vec<Vec<String>> = view
            .checks
            .iter()
            .map(|check| {
                vec![
                    check.name.clone(),
                    check.kind.clone(),
                    if check.critical { "critical" } else { "" }.to_owned(),
                    if check.healthy {
                        "healthy"
                    } else {
                        "UNHEALTHY"
                    }
                    .to_owned(),
                    format!(
                        "{} x{} ({} ms)",
                        if check.last_passed { "pass" } else { "fail" },
                        check.consecutive,
                        check.last_duration_ms
                    ),
                    check.target.clone(),
                ]
            })
            .collect();
        print!(
            "{}",
            render_table(
                &["NAME", "KIND", "CRITICAL", "VERDICT", "LAST", "TARGET"],
                &rows
            )
        );
        for check in view
            .checks
            .iter()
            .filter(|check| !check.last_output.is_empty())
        {
            println!(
                "\noutput of {} (last run {}):",
                check.name,
                check.last_run_at.clone().unwrap_or_default()
            );
            for line in check.last_output.lines() {
                println!("  | {line}");
            }
        }
    }
    if let Some(metrics) = &view.metrics {
        println!("\nmetrics:");
        for disk in &metrics.disks {
            println!(
                "  disk {:<12} {:.1}% used ({} of {} bytes)",
                disk.mount, disk.used_percent, disk.used_bytes, disk.total_bytes
            );
        }
        println!(
            "  memory           {} of {} bytes available",
            metrics.memory_available_bytes, metrics.memory_total_bytes
        );
        println!(
            "  load             {:.2} {:.2} {:.2}",
            metrics.load1, metrics.load5, metrics.load15
        );
        println!("  uptime           {} s", metrics.uptime_seconds);
    }
    for breach in &view.metric_breaches {
        println!("  THRESHOLD EXCEEDED: {breach}");
    }
    if !view.transitions.is_empty() {
        println!("\nhistory (newest first):");
        let rows: Vec<Vec<String>> = view
            .transitions
            .iter()
            .map(|transition| {
                vec![
                    transition.at.clone(),
                    format!("{} -> {}", transition.from, transition.to),
                    transition.reason.clone(),
                ]
            })
            .collect();
        print!("{}", render_table(&["TIME", "CHANGE", "REASON"], &rows));
    }
}

async fn run_status(cli: &Cli, by: &str, selector: &str) -> Result<(), CtlError> {
    let (channel, diagnostics) = connect(cli)?;
    let rpc = rpc_error(&diagnostics);
    let status = MachinesClient::new(channel.clone())
        .fleet_status(FleetStatusRequest {
            by: by.to_owned(),
            selector: selector.to_owned(),
        })
        .await
        .map_err(&rpc)?
        .into_inner();
    let remediation = repair::remediation_status(channel, &rpc).await?;
    print_status(cli.output(), &status, &remediation)
}

/// Runs one flottectl invocation and returns the process exit code.
pub async fn main(cli: Cli) -> ExitCode {
    let result = match cli.check_output_flag() {
        Err(error) => Err(error),
        Ok(()) => match &cli.command {
            Command::Token(command) => run_token(&cli, command).await,
            Command::Machines(command) => run_machines(&cli, command).await,
            Command::Status { by, selector } => run_status(&cli, by, selector).await,
            Command::Operator(command) => run_operator(&cli, command).await,
            Command::Image(command) => images::run_image(&cli, command).await,
            Command::Audit(command) => run_audit(&cli, command).await,
            Command::Dr(command) => repair::run_dr(&cli, command).await,
            Command::Remediation(command) => repair::run_remediation(&cli, command).await,
            Command::Rollout(command) => rollouts::run_rollout(&cli, command).await,
            Command::User(command) => access::run_user(&cli, command).await,
            Command::Access(command) => access::run_access(&cli, command).await,
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flottectl: {error}");
            error.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let table = render_table(
            &["ID", "NAME"],
            &[
                vec!["1".into(), "alpha".into()],
                vec!["22".into(), "b".into()],
            ],
        );
        assert_eq!(table, "ID  NAME\n1   alpha\n22  b\n");
    }

    #[test]
    fn times_render_as_rfc3339_or_never() {
        assert_eq!(format_time(0), "never");
        assert_eq!(format_time(86_400), "1970-01-02T00:00:00Z");
    }
}
