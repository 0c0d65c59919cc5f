//! `flottectl version`: this client's release and the answering server's
//! (with its replica name and who the caller is to it, from
//! `Operators.WhoAmI`), and what is generated from the CLI definition
//! itself, so that it never drifts from it: `flottectl completion SHELL`
//! and `flottectl man --out DIR` (one page per command).

use std::io::Write;

use clap::CommandFactory;
use flotte_proto::v1::operators_client::OperatorsClient;
use flotte_proto::v1::{WhoAmIRequest, WhoAmIResponse};
use serde::Serialize;

use crate::cli::{rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{print_json, print_line, Output};

#[derive(Debug, Serialize)]
struct Versions {
    client_version: String,
    server_version: String,
    server_name: String,
    operator: String,
    role: String,
}

async fn ask_who_am_i(cli: &Cli) -> Result<WhoAmIResponse, CtlError> {
    let (channel, diagnostics) = cli.connect().await?;
    Ok(OperatorsClient::new(channel)
        .who_am_i(WhoAmIRequest {})
        .await
        .map_err(rpc_error(&diagnostics))?
        .into_inner())
}

pub async fn run(cli: &Cli) -> Result<(), CtlError> {
    let client_version = env!("CARGO_PKG_VERSION");
    let answer = match ask_who_am_i(cli).await {
        Ok(answer) => answer,
        Err(error) => {
            // The client's own version is known whatever the server does.
            if cli.output() == Output::Table {
                print_line!("client  flottectl {client_version}");
            }
            return Err(error);
        }
    };
    let versions = Versions {
        client_version: client_version.to_owned(),
        server_version: answer.server_version,
        server_name: answer.server_name,
        operator: answer.operator,
        role: answer.role,
    };
    if cli.output() == Output::Json {
        return print_json(&versions);
    }
    print_line!("client  flottectl {}", versions.client_version);
    print_line!(
        "server  flotte-server {} (replica {})",
        versions.server_version,
        versions.server_name
    );
    print_line!("you     {} ({})", versions.operator, versions.role);
    Ok(())
}

/// Writes the completion script for `shell` to stdout.
pub fn completion(shell: clap_complete::Shell) -> Result<(), CtlError> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "flottectl", &mut script);
    std::io::stdout()
        .lock()
        .write_all(&script)
        .map_err(|source| CtlError::Io {
            what: "cannot write the completion script".into(),
            source,
        })
}

/// Writes one man page per command (`flottectl.1`,
/// `flottectl-rollout-create.1`, …) into `directory`, creating it.
pub fn man_pages(directory: &std::path::Path) -> Result<(), CtlError> {
    let failed = |source| CtlError::WriteFile {
        path: directory.to_owned(),
        source,
    };
    std::fs::create_dir_all(directory).map_err(failed)?;
    clap_mangen::generate_to(Cli::command(), directory).map_err(failed)?;
    print_line!(
        "man pages written to {}; e.g. `man -l {}`",
        directory.display(),
        directory.join("flottectl-rollout-create.1").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_know_the_nouns_and_their_subcommands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "flottectl", &mut script);
            let script = String::from_utf8(script).unwrap();
            for word in ["machines", "set-image", "plan-init", "renew", "completion"] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
    }

    #[test]
    fn man_pages_cover_every_command_with_its_descriptions() {
        let directory = std::env::temp_dir().join(format!("flottectl-man-{}", std::process::id()));
        man_pages(&directory).unwrap();
        let create = std::fs::read_to_string(directory.join("flottectl-rollout-create.1")).unwrap();
        assert!(
            create.starts_with(".ie") || create.contains(".TH"),
            "{create}"
        );
        assert!(create.contains("The plan file"), "{create}");
        let pages = std::fs::read_dir(&directory).unwrap().count();
        let mut commands = 0;
        fn count(command: &clap::Command, commands: &mut usize) {
            *commands += 1;
            for subcommand in command.get_subcommands() {
                count(subcommand, commands);
            }
        }
        count(&Cli::command(), &mut commands);
        assert_eq!(pages, commands, "one page per command");
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
