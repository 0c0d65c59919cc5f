//! `flotte-agent`: thin entry point. `run` starts the agent from a config file
//! or flags; the work is in the `flotte_agent` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flotte_agent::config::{read_config_file, AgentConfigFile};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "flotte-agent", version, about = "Flotte machine agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll (first start) and keep the session with the server.
    Run {
        /// Log lines as `text` (for people) or `json` (one object per line,
        /// fields in docs/logs.md).
        #[arg(long, default_value = "text")]
        log_format: flotte_proto::logging::LogFormat,
        /// Agent settings file; flags below override its values.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the agent keeps its identity, images and state
        /// (default /var/lib/flotte-agent).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Server address host:port (repeatable; tried in order).
        #[arg(long = "server")]
        servers: Vec<String>,
        /// Join token for the first start.
        #[arg(long = "join", env = "FLOTTE_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<String>,
        /// Hostname to report instead of the kernel's.
        #[arg(long)]
        hostname: Option<String>,
        /// Report interval until the server sends its own (e.g. 10s).
        #[arg(long)]
        report_interval: Option<String>,
        /// Longest wait between reconnect attempts (e.g. 2m).
        #[arg(long)]
        reconnect_max_backoff: Option<String>,
    },
    /// Prints the SSH keys in force for LOGIN from the agent's local state,
    /// for sshd's `AuthorizedKeysCommand /usr/local/bin/flotte-agent
    /// authorized-keys %u`. Prints nothing (and succeeds) for a login
    /// without keys; works while the agent or the server is down.
    AuthorizedKeys {
        /// Agent settings file (its data_dir and [access] table are used).
        #[arg(long, default_value = "/etc/flotte/agent.toml")]
        config: PathBuf,
        /// Overrides the config's data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The Unix login sshd asks about (`%u`).
        login: String,
    },
}

/// `authorized-keys`: reads only what it needs from the config (sshd calls
/// it for every login attempt; the agent's other settings are irrelevant).
fn print_authorized_keys(
    config: &std::path::Path,
    data_dir: Option<PathBuf>,
    login: &str,
) -> ExitCode {
    use flotte_agent::access::policy::OnDisconnect;
    let (file_data_dir, on_disconnect) = match read_config_file(config) {
        Ok(file) => {
            let mut problems = Vec::new();
            let on_disconnect = file.access.as_ref().map_or(OnDisconnect::Keep, |access| {
                access.validate(&mut problems).on_disconnect
            });
            if !problems.is_empty() {
                eprintln!(
                    "flotte-agent: {}: {}",
                    config.display(),
                    problems.join("; ")
                );
                return ExitCode::from(2);
            }
            (file.data_dir, on_disconnect)
        }
        Err(error) if data_dir.is_some() => {
            tracing::debug!(%error, "no usable config; using --data-dir");
            (PathBuf::new(), OnDisconnect::Keep)
        }
        Err(error) => {
            eprintln!("flotte-agent: {error}");
            return ExitCode::from(2);
        }
    };
    let data_dir = data_dir.unwrap_or(file_data_dir);
    match flotte_agent::access::authorized_keys_for(
        &data_dir,
        on_disconnect,
        login,
        flotte_agent::clock::unix_now(),
    ) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("flotte-agent: {error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let command = Cli::parse().command;
    if let Command::AuthorizedKeys {
        config,
        data_dir,
        login,
    } = &command
    {
        return print_authorized_keys(config, data_dir.clone(), login);
    }
    let Command::Run {
        config,
        data_dir,
        servers,
        join_token,
        hostname,
        report_interval,
        reconnect_max_backoff,
        log_format,
    } = command
    else {
        return ExitCode::FAILURE; // every other command returned above
    };
    flotte_proto::logging::init_logging(log_format);

    let mut file = match &config {
        Some(path) => match read_config_file(path) {
            Ok(file) => file,
            Err(error) => {
                eprintln!("flotte-agent: {error}");
                return ExitCode::from(2);
            }
        },
        // Flags alone: the same defaults as an empty config file.
        None => match toml::from_str::<AgentConfigFile>("") {
            Ok(file) => file,
            Err(error) => {
                eprintln!("flotte-agent: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    if let Some(data_dir) = data_dir {
        file.data_dir = data_dir;
    }
    if !servers.is_empty() {
        file.servers = servers;
    }
    if join_token.is_some() {
        file.join_token = join_token;
        file.join_token_file = None;
    }
    if hostname.is_some() {
        file.hostname = hostname;
    }
    if let Some(interval) = report_interval {
        file.report_interval = interval;
    }
    if let Some(backoff) = reconnect_max_backoff {
        file.reconnect_max_backoff = backoff;
    }
    let config = match file.validate() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("flotte-agent: {error}");
            return ExitCode::from(2);
        }
    };
    // A small agent: one worker thread is plenty and keeps RSS low.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flotte-agent: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signal_shutdown = shutdown.clone();
        tokio::spawn(async move {
            flotte_proto::signals::wait_for_termination().await;
            tracing::info!("stopping: asked to by a signal (SIGTERM or Ctrl-C)");
            signal_shutdown.cancel();
        });
        match flotte_agent::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            // Exit status 2: the unit's RestartPreventExitStatus, so that
            // systemd does not restart a decommissioned machine's agent.
            Err(error @ flotte_agent::AgentError::Decommissioned(_)) => {
                eprintln!("flotte-agent: {error}");
                ExitCode::from(2)
            }
            Err(error) => {
                eprintln!("flotte-agent: {error}");
                ExitCode::FAILURE
            }
        }
    })
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
