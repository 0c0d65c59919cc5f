//! The command line as a whole: the global flags (profile, server, output),
//! the nouns (each noun's subcommands live in its own module), and dialing
//! the server with the profile's mutual-TLS identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use flotte_common::profile::Profile;
use flotte_proto::transport::{
    channel_with_diagnostics, client_config, explain_status_with, TlsDiagnostics,
};
use tonic::transport::Channel;

use crate::error::CtlError;
use crate::output::Output;
use crate::{
    access, audit, dr, images, integrity, machines, operators, repair, rollouts, status, tokens,
    ui, users,
};

#[derive(Debug, Parser)]
#[command(name = "flottectl", version, about = "Flotte admin CLI")]
pub struct Cli {
    /// Operator profile directory (ca.pem, cert.pem, key.pem, profile.toml).
    #[arg(long, env = "FLOTTE_PROFILE", global = true)]
    profile: Option<PathBuf>,
    /// Server address (host:port), overriding the profile's; several
    /// replicas as a comma-separated list, tried in turn.
    #[arg(long, env = "FLOTTE_SERVER", global = true)]
    server: Option<String>,
    /// Output format.
    /// Output format: table or json. (`image build -o FILE` also takes the
    /// image file here, as `flottectl image build … -o app-1.2.0.flotte`.)
    #[arg(short = 'o', long = "output", default_value = "table", global = true)]
    pub output_flag: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join tokens for enrolling machines.
    #[command(subcommand)]
    Token(tokens::TokenCommand),
    /// Enrolled machines.
    #[command(subcommand, alias = "machine")]
    Machines(machines::MachinesCommand),
    /// Machines per state, per zone and per value of a label.
    Status(status::StatusArguments),
    /// Operators (people and CI jobs) and their roles.
    #[command(subcommand, alias = "operators")]
    Operator(operators::OperatorCommand),
    /// Images (for now: the release keys trusted to sign them).
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// The hash-chained audit log of every mutating call.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Disaster recovery: zone-loss impact and single points of failure.
    #[command(subcommand)]
    Dr(dr::DrCommand),
    /// Automatic remediation events.
    #[command(subcommand)]
    Remediation(repair::RemediationCommand),
    /// Staged rollouts of an image: qualification → canary → waves.
    #[command(subcommand, alias = "rollouts")]
    Rollout(rollouts::RolloutCommand),
    /// People who log into machines over SSH, and their keys.
    #[command(subcommand, alias = "users")]
    User(users::UserCommand),
    /// SSH access grants, propagation status and the who-has-access report.
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// A local web dashboard (fleet, rollouts, access, DR, audit), acting
    /// with this profile; prints its URL, which carries a secret.
    Ui(ui::UiArguments),
    /// Image drift found by the machines' verifications.
    #[command(subcommand)]
    Drift(integrity::DriftCommand),
}

impl Cli {
    /// The output format; anything but `json` renders tables (the value was
    /// checked by [`Cli::check_output_flag`] before any command ran).
    pub fn output(&self) -> Output {
        if self.output_flag == "json" {
            Output::Json
        } else {
            Output::Table
        }
    }

    /// `-o` must name a format, except for `image build`, where it may name
    /// the image file.
    pub fn check_output_flag(&self) -> Result<(), CtlError> {
        let is_format = matches!(self.output_flag.as_str(), "table" | "json");
        let is_build = matches!(
            self.command,
            Command::Image(images::ImageCommand::Build { .. })
        );
        if is_format || is_build {
            Ok(())
        } else {
            Err(CtlError::Usage(format!(
                "-o {:?}: expected table or json",
                self.output_flag
            )))
        }
    }

    /// The operator profile directory (where `flottectl` also keeps what it
    /// remembers for that server, such as the last signed audit head).
    pub fn profile_dir(&self) -> Result<&std::path::Path, CtlError> {
        self.profile.as_deref().ok_or(CtlError::NoProfile)
    }

    /// The operator profile this invocation acts as.
    pub fn load_profile(&self) -> Result<Profile, CtlError> {
        let directory = self.profile.as_ref().ok_or(CtlError::NoProfile)?;
        Ok(Profile::load(directory)?)
    }

    /// The server address this invocation dials: `--server`, else the profile's.
    pub fn server_address(&self, profile: &Profile) -> String {
        self.server
            .clone()
            .unwrap_or_else(|| profile.settings.server.clone())
    }

    /// A channel to the server with the profile's identity, and what the
    /// handshake tells about a refusal (to explain failed calls).
    pub fn connect(&self) -> Result<(Channel, TlsDiagnostics), CtlError> {
        let profile = self.load_profile()?;
        let tls = client_config(
            &profile.ca_pem,
            Some((&profile.certificate_pem, &profile.key_pem)),
        )?;
        Ok(channel_with_diagnostics(
            &self.server_address(&profile),
            Arc::new(tls),
        )?)
    }
}

/// Reads a file an operator named, naming it in the error.
pub fn read_file(path: &Path) -> Result<String, CtlError> {
    std::fs::read_to_string(path).map_err(|source| CtlError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

/// Turns a failed RPC into an error naming its real cause.
pub fn rpc_error(diagnostics: &TlsDiagnostics) -> impl Fn(tonic::Status) -> CtlError + '_ {
    move |status| CtlError::Rpc(explain_status_with(&status, diagnostics))
}
