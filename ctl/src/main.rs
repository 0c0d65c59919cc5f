//! `flottectl`: the Flotte admin CLI. Each command is one admin RPC (or a
//! stream of them, for `watch`), rendered as a table for people or as JSON
//! (`-o json`) for scripts.
//!
//! Layout: `cli` parses the global flags and dials the server; each noun
//! (`tokens`, `machines`, `status`, `images`, `trust`, `rollouts`,
//! `access`, `users`, `operators`, `audit`, `repair`, `dr`, `version`,
//! `profiles`) owns its
//! subcommand enum, its handler and its views; `ui` is the web dashboard
//! (`flottectl ui`), a client of the same API; `output` is the one place
//! that renders tables and JSON; `error` maps every failure to an exit code.
//!
//! It holds no rule the server does not also enforce: validation here only
//! gives earlier, clearer errors. It must never link the server crate (nor
//! its SQLite): what it shares with the server comes from `flotte-common`
//! and `flotte-proto` (`cargo tree -p flottectl` shows neither rusqlite nor
//! flotte-server).

use std::process::ExitCode;

use clap::Parser;

mod access;
mod audit;
mod cli;
mod dr;
mod error;
mod images;
mod integrity;
mod machines;
mod operators;
mod output;
mod profiles;
mod repair;
mod rollouts;
mod status;
mod tokens;
mod trust;
mod ui;
mod users;
mod version;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(error) => {
            output::note_message(&format!(
                "flottectl: cannot start the async runtime: {error}"
            ));
            ExitCode::FAILURE
        }
    }
}

/// Runs one flottectl invocation and returns the process exit code.
async fn run(cli: Cli) -> ExitCode {
    output::choose_document_format(cli.document_format());
    let result = match &cli.command {
        Command::Token(command) => tokens::run(&cli, command).await,
        Command::Machines(command) => machines::run(&cli, command).await,
        Command::Status(arguments) => status::run(&cli, arguments).await,
        Command::Operator(command) => operators::run(&cli, command).await,
        Command::Image(command) => images::run(&cli, command).await,
        Command::Audit(command) => audit::run(&cli, command).await,
        Command::Dr(command) => dr::run(&cli, command).await,
        Command::Remediation(command) => repair::run_remediation(&cli, command).await,
        Command::Rollout(command) => rollouts::run(&cli, command).await,
        Command::User(command) => users::run(&cli, command).await,
        Command::Access(command) => access::run(&cli, command).await,
        Command::Ui(arguments) => ui::run(&cli, arguments).await,
        Command::Drift(command) => integrity::run_drift(&cli, command).await,
        Command::Version => version::run(&cli).await,
        Command::Profile(command) => profiles::run(cli.output(), command),
        Command::Completion { shell } => version::completion(*shell),
        Command::Man { out } => version::man_pages(out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            output::note_message(&format!("flottectl: {error}"));
            error.exit_code()
        }
    }
}
