//! The command line as a whole: the global flags (profile, server, output),
//! the nouns (each noun's subcommands live in its own module), and dialing
//! the server with the profile's mutual-TLS identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use flotte_common::profile::Profile;
use flotte_proto::labels::Selector;
use flotte_proto::transport::{
    channel_with_diagnostics, client_config, explain_status_with, TlsDiagnostics,
};
use tonic::transport::Channel;

use crate::error::CtlError;
use crate::output::{self, DocumentFormat, Output, OutputFormat};
use crate::{
    access, audit, dr, images, integrity, machines, operators, profiles, repair, rollouts, status,
    tokens, ui, users,
};

#[derive(Debug, Parser)]
#[command(name = "flottectl", version, about = "Flotte admin CLI")]
pub struct Cli {
    /// Operator profile: a directory (ca.pem, cert.pem, key.pem,
    /// profile.toml) or the name of one under $XDG_CONFIG_HOME/flotte/profiles
    /// (default: the current one, see `flottectl profile`).
    #[arg(long, env = "FLOTTE_PROFILE", global = true)]
    profile: Option<PathBuf>,
    /// Server address (host:port), overriding the profile's; several
    /// replicas as a comma-separated list, tried in turn.
    #[arg(long, env = "FLOTTE_SERVER", global = true)]
    server: Option<String>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value_t = OutputFormat::Table,
        global = true
    )]
    output_format: OutputFormat,
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
    /// This client's version and the server's (and who you are to it).
    Version,
    /// Named operator profiles: list, choose the current one, import.
    #[command(subcommand, alias = "profiles")]
    Profile(profiles::ProfileCommand),
    /// Print a shell completion script, e.g. `flottectl completion bash >
    /// /etc/bash_completion.d/flottectl`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages, one per command, into DIR (e.g.
    /// /usr/local/share/man/man1).
    Man {
        /// The directory to write them into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

impl Cli {
    /// The format `-o` names.
    pub fn output_format(&self) -> OutputFormat {
        self.output_format
    }

    /// The output format: `json` and `yaml` print documents (encoded as
    /// [`Cli::document_format`] says), anything else renders tables.
    pub fn output(&self) -> Output {
        self.output_format().output()
    }

    /// Whether tables show their wide columns (`-o wide`).
    pub fn wide(&self) -> bool {
        self.output_format() == OutputFormat::Wide
    }

    /// How documents are encoded: YAML for `-o yaml`, JSON otherwise.
    pub fn document_format(&self) -> DocumentFormat {
        self.output_format().document_format()
    }

    /// The operator profile directory (where `flottectl` also keeps what it
    /// remembers for that server, such as the last signed audit head).
    pub fn profile_dir(&self) -> Result<PathBuf, CtlError> {
        profiles::resolve_profile_directory(self.profile.as_deref())
    }

    /// The operator profile this invocation acts as.
    pub fn load_profile(&self) -> Result<Profile, CtlError> {
        Ok(Profile::load(&self.profile_dir()?)?)
    }

    /// The server address this invocation dials: `--server`, else the profile's.
    pub fn server_address(&self, profile: &Profile) -> String {
        self.server
            .clone()
            .unwrap_or_else(|| profile.settings.server.clone())
    }

    /// A channel to the server with the profile's identity, and what the
    /// handshake tells about a refusal (to explain failed calls). A
    /// certificate with less than a third of its lifetime left is renewed
    /// first (a failed renewal is reported and the call goes on with the old
    /// one); one expiring within 14 days is warned about.
    pub async fn connect(&self) -> Result<(Channel, TlsDiagnostics), CtlError> {
        let mut profile = self.load_profile()?;
        let validity = profile.certificate_validity()?;
        let now = SystemTime::now();
        if validity.renewal_due(now) && !validity.is_expired(now) {
            if let Err(error) = operators::renew_profile(self, &mut profile).await {
                output::note_message(&format!(
                    "flottectl: warning: could not renew the profile's certificate: {error}"
                ));
            }
        }
        warn_if_expiring_soon(&self.profile_dir()?, &profile)?;
        self.channel(&profile)
    }

    /// A channel to the server with `profile`'s identity, as it is.
    pub fn channel(&self, profile: &Profile) -> Result<(Channel, TlsDiagnostics), CtlError> {
        let tls = client_config(
            &profile.ca_pem,
            Some((&profile.certificate_pem, &profile.key_pem)),
        )?;
        Ok(channel_with_diagnostics(
            &self.server_address(profile),
            Arc::new(tls),
        )?)
    }
}

/// Within this of its expiry a profile's certificate is warned about on every
/// command (automatic renewal starts well before, at a third of 90 days).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Warns (on stderr) when the profile's certificate expires within
/// [`EXPIRY_WARNING`] or has expired, saying what to do.
fn warn_if_expiring_soon(directory: &Path, profile: &Profile) -> Result<(), CtlError> {
    let validity = profile.certificate_validity()?;
    let now = SystemTime::now();
    let remaining = validity.remaining(now);
    if remaining >= EXPIRY_WARNING {
        return Ok(());
    }
    let at = humantime::format_rfc3339_seconds(validity.not_after);
    let message = if validity.is_expired(now) {
        format!(
            "flottectl: warning: the certificate of profile {} expired at {at}: ask an admin for \
             a new profile (or run `flotte-server admin-profile` on the server host)",
            directory.display()
        )
    } else {
        format!(
            "flottectl: warning: the certificate of profile {} expires at {at} (in {}): run \
             `flottectl operator renew`",
            directory.display(),
            humantime::format_duration(Duration::from_secs(remaining.as_secs()))
        )
    };
    output::note_message(&message);
    Ok(())
}

/// The help of every `--selector`: one grammar, documented once.
pub const SELECTOR_HELP: &str = "Label selector, e.g. role=web,env!=prod,zone in (dc1,dc2),\
tier notin (gold),canary,!legacy (see docs/selectors.md); empty: every machine";

/// A `--selector` checked with the one selector grammar
/// ([`flotte_proto::labels::Selector`]) before any round trip, kept as
/// written: the server parses the same text with the same code.
pub fn selector_argument(text: &str) -> Result<String, String> {
    Selector::parse(text)
        .map(|_| text.to_owned())
        .map_err(|error| error.to_string())
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_command_and_argument_is_described_in_help() {
        flotte_proto::cli_help::assert_every_argument_described(&Cli::command());
    }
}
