//! `flottectl access grant | revoke | list | status | report`: SSH access
//! grants by selector, how far a policy version has reached the fleet, and
//! who can reach what — granted and actually found on the machines.

use clap::Subcommand;
use flotte_proto::v1::access_client::AccessClient;
use flotte_proto::v1::{
    AccessReportRequest, AccessReportResponse, AccessStatusRequest, AccessStatusResponse,
    GrantInfo, GrantRequest, ListGrantsRequest, RevokeGrantRequest,
};
use serde::Serialize;

use crate::cli::{rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{
    note_line, optional_time, print_json, print_line, print_list, print_table, Output,
};

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Let USER log in as LOGIN on the machines matching the selector.
    /// A selector is required: `--all` says on purpose that every machine,
    /// now and to come, is meant.
    Grant {
        /// The user (see `user add`).
        user: String,
        /// The machines, e.g. role=web,env!=prod,zone in (dc1,dc2) (or --all);
        /// the grammar is docs/selectors.md's.
        #[arg(
            long,
            required_unless_present = "all",
            conflicts_with = "all",
            value_parser = crate::cli::selector_argument
        )]
        selector: Option<String>,
        /// Every machine of the fleet, now and to come.
        #[arg(long)]
        all: bool,
        /// The Unix login the user's keys are installed for.
        #[arg(long)]
        login: String,
        /// RFC 3339 UTC time, e.g. 2027-01-31T00:00:00Z (default: never).
        #[arg(long, default_value = "")]
        expires: String,
    },
    /// Remove one grant.
    Revoke {
        /// The grant's id, as `access list` shows it.
        grant: String,
    },
    /// List grants (of one user with --user).
    List {
        /// Only this user's grants.
        #[arg(long, default_value = "")]
        user: String,
    },
    /// Which machines applied the access policy (the latest version, or V).
    Status {
        /// The policy version to check (0: the latest).
        #[arg(long, default_value_t = 0)]
        version: u64,
    },
    /// Who can reach what: granted keys and the keys machines actually have.
    Report {
        /// Only what this user can reach.
        #[arg(long, default_value = "", conflicts_with = "machine")]
        user: String,
        /// Only who can reach this machine (id, id prefix or hostname).
        #[arg(long, default_value = "")]
        machine: String,
    },
}

#[derive(Debug, Serialize)]
pub struct GrantView {
    id: String,
    user: String,
    selector: String,
    login: String,
    expires_at: Option<String>,
    created_at: Option<String>,
    created_by: String,
    machines_matching: u32,
}

impl From<&GrantInfo> for GrantView {
    fn from(grant: &GrantInfo) -> Self {
        GrantView {
            id: grant.id.clone(),
            user: grant.user.clone(),
            selector: grant.selector.clone(),
            login: grant.login.clone(),
            expires_at: optional_time(grant.expires_at),
            created_at: optional_time(grant.created_at),
            created_by: grant.created_by.clone(),
            machines_matching: grant.machines,
        }
    }
}

const GRANT_HEADERS: [&str; 6] = ["ID", "USER", "LOGIN", "SELECTOR", "MACHINES", "EXPIRES"];

fn grant_row(grant: &GrantView) -> Vec<String> {
    vec![
        grant.id.clone(),
        grant.user.clone(),
        grant.login.clone(),
        if grant.selector.is_empty() {
            "(all machines)".to_owned()
        } else {
            grant.selector.clone()
        },
        grant.machines_matching.to_string(),
        grant.expires_at.clone().unwrap_or_else(|| "never".into()),
    ]
}

/// The grants table of `access list` and `user show`.
pub fn print_grant_rows(grants: &[GrantView]) {
    print_table(
        &GRANT_HEADERS,
        &grants.iter().map(grant_row).collect::<Vec<_>>(),
    );
}

/// The selector a grant is sent with: `--selector` as given (an empty one
/// would select every machine, which only `--all` may say), or none with
/// `--all` (clap makes sure one of them was given).
fn grant_selector(selector: Option<&str>) -> Result<String, CtlError> {
    match selector {
        Some(selector) if selector.trim().is_empty() => Err(CtlError::Usage(
            "--selector is empty, which would select every machine: pass --all to mean that".into(),
        )),
        Some(selector) => Ok(selector.to_owned()),
        None => Ok(String::new()),
    }
}

fn print_grants(output: Output, grants: &[GrantInfo]) -> Result<(), CtlError> {
    let views: Vec<GrantView> = grants.iter().map(GrantView::from).collect();
    print_list(output, &views, &GRANT_HEADERS, grant_row)
}

#[derive(Debug, Serialize)]
struct StatusMachineView {
    machine_id: String,
    hostname: String,
    status: String,
    applied_version: u64,
    applied_at: Option<String>,
    /// Keys or logins of the policy the agent refused to install.
    refused: u32,
}

#[derive(Debug, Serialize)]
struct StatusView {
    version: u64,
    current_version: u64,
    applied: u32,
    pending: u32,
    unreachable: u32,
    machines: Vec<StatusMachineView>,
}

fn print_status(output: Output, status: &AccessStatusResponse) -> Result<(), CtlError> {
    let view = StatusView {
        version: status.version,
        current_version: status.current_version,
        applied: status.applied,
        pending: status.pending,
        unreachable: status.unreachable,
        machines: status
            .machines
            .iter()
            .map(|machine| StatusMachineView {
                machine_id: machine.machine_id.clone(),
                hostname: machine.hostname.clone(),
                status: machine.status.clone(),
                applied_version: machine.applied_version,
                applied_at: optional_time(machine.applied_at),
                refused: machine.refused,
            })
            .collect(),
    };
    if output == Output::Json {
        return print_json(&view);
    }
    print_line!(
        "access policy version {} (current {}): {} applied, {} pending, {} unreachable",
        view.version,
        view.current_version,
        view.applied,
        view.pending,
        view.unreachable
    );
    let rows: Vec<Vec<String>> = view
        .machines
        .iter()
        .map(|machine| {
            vec![
                machine.machine_id.chars().take(8).collect(),
                machine.hostname.clone(),
                machine.status.clone(),
                machine.applied_version.to_string(),
                machine.applied_at.clone().unwrap_or_default(),
                machine.refused.to_string(),
            ]
        })
        .collect();
    print_table(
        &["ID", "HOSTNAME", "STATUS", "APPLIED", "AT", "REFUSED"],
        &rows,
    );
    if view.machines.iter().any(|machine| machine.refused > 0) {
        print_line!("some agents refused part of the policy: see `flottectl access report`");
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct ReportEntryView {
    machine_id: String,
    hostname: String,
    login: String,
    user: Option<String>,
    fingerprint: String,
    key_type: String,
    granted: bool,
    found: bool,
    drift: bool,
    sources: Vec<String>,
    grant_id: Option<String>,
    expires_at: Option<String>,
}

/// What an agent refused to install, or a key file it could not read.
#[derive(Debug, Serialize)]
struct ProblemView {
    machine_id: String,
    hostname: String,
    login: String,
    kind: String,
    user: Option<String>,
    grant_id: Option<String>,
    subject: String,
    reason: String,
}

#[derive(Debug, Serialize)]
struct ReportView {
    entries: Vec<ReportEntryView>,
    missing_logins: Vec<String>,
    problems: Vec<ProblemView>,
}

fn print_report(output: Output, report: &AccessReportResponse) -> Result<(), CtlError> {
    let non_empty = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    let view = ReportView {
        entries: report
            .entries
            .iter()
            .map(|entry| ReportEntryView {
                machine_id: entry.machine_id.clone(),
                hostname: entry.hostname.clone(),
                login: entry.login.clone(),
                user: non_empty(&entry.user),
                fingerprint: entry.fingerprint.clone(),
                key_type: entry.key_type.clone(),
                granted: entry.granted,
                found: entry.found,
                drift: entry.drift,
                sources: entry.sources.clone(),
                grant_id: non_empty(&entry.grant_id),
                expires_at: optional_time(entry.expires_at),
            })
            .collect(),
        missing_logins: report.missing_logins.clone(),
        problems: report
            .problems
            .iter()
            .map(|problem| ProblemView {
                machine_id: problem.machine_id.clone(),
                hostname: problem.hostname.clone(),
                login: problem.login.clone(),
                kind: problem.kind.clone(),
                user: non_empty(&problem.user),
                grant_id: non_empty(&problem.grant_id),
                subject: problem.subject.clone(),
                reason: problem.reason.clone(),
            })
            .collect(),
    };
    if output == Output::Json {
        return print_json(&view);
    }
    let rows: Vec<Vec<String>> = view
        .entries
        .iter()
        .map(|entry| {
            let state = match (entry.granted, entry.found) {
                (true, true) => "granted, present",
                (true, false) => "granted, not yet on the machine",
                (false, _) => "DRIFT: present, not granted",
            };
            vec![
                entry.hostname.clone(),
                entry.login.clone(),
                entry.user.clone().unwrap_or_else(|| "(unknown)".into()),
                entry.fingerprint.clone(),
                state.to_owned(),
                entry.expires_at.clone().unwrap_or_else(|| "never".into()),
                entry.sources.join(", "),
            ]
        })
        .collect();
    print_table(
        &[
            "MACHINE",
            "LOGIN",
            "USER",
            "FINGERPRINT",
            "STATE",
            "EXPIRES",
            "FOUND IN",
        ],
        &rows,
    );
    for missing in &view.missing_logins {
        print_line!("login missing on the machine: {missing}");
    }
    if !view.problems.is_empty() {
        let rows: Vec<Vec<String>> = view
            .problems
            .iter()
            .map(|problem| {
                vec![
                    problem.hostname.clone(),
                    problem.login.clone(),
                    problem.kind.clone(),
                    problem.user.clone().unwrap_or_default(),
                    problem.subject.clone(),
                    problem.reason.clone(),
                ]
            })
            .collect();
        print_line!("refused by the agents or not read:");
        print_table(
            &["MACHINE", "LOGIN", "KIND", "USER", "KEY OR FILE", "WHY"],
            &rows,
        );
    }
    Ok(())
}

pub async fn run(cli: &Cli, command: &AccessCommand) -> Result<(), CtlError> {
    let (channel, diagnostics) = cli.connect().await?;
    let rpc = rpc_error(&diagnostics);
    let mut client = AccessClient::new(channel);
    let output = cli.output();
    match command {
        AccessCommand::Grant {
            user,
            selector,
            all: _,
            login,
            expires,
        } => {
            let selector = grant_selector(selector.as_deref())?;
            let grant = client
                .grant(GrantRequest {
                    user: user.clone(),
                    selector,
                    login: login.clone(),
                    expires: expires.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_grants(output, std::slice::from_ref(&grant))?;
            if grant.expires_at == 0 {
                note_line!(
                    "grant {} never expires: it lasts until `flottectl access revoke {}` (or give --expires)",
                    grant.id,
                    grant.id
                );
            }
            Ok(())
        }
        AccessCommand::Revoke { grant } => {
            let grant = client
                .revoke_grant(RevokeGrantRequest { id: grant.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_grants(output, std::slice::from_ref(&grant))
        }
        AccessCommand::List { user } => {
            let grants = client
                .list_grants(ListGrantsRequest { user: user.clone() })
                .await
                .map_err(&rpc)?
                .into_inner()
                .grants;
            print_grants(output, &grants)
        }
        AccessCommand::Status { version } => {
            let status = client
                .access_status(AccessStatusRequest { version: *version })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_status(output, &status)
        }
        AccessCommand::Report { user, machine } => {
            let report = client
                .access_report(AccessReportRequest {
                    user: user.clone(),
                    machine: machine.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_report(output, &report)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn parse(arguments: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(
            ["flottectl", "access", "grant", "alice", "--login", "alice"]
                .iter()
                .chain(arguments),
        )
    }

    #[test]
    fn a_grant_names_its_machines_or_says_all_on_purpose() {
        let missing = parse(&[]).unwrap_err();
        assert!(missing.to_string().contains("--selector"), "{missing}");
        assert!(parse(&["--all", "--selector", "role=web"]).is_err());
        assert!(parse(&["--all"]).is_ok());
        assert!(parse(&["--selector", "role=web"]).is_ok());
        assert_eq!(grant_selector(None).unwrap(), "");
        assert_eq!(grant_selector(Some("role=web")).unwrap(), "role=web");
        let empty = grant_selector(Some(" ")).unwrap_err();
        assert!(empty.to_string().contains("--all"), "{empty}");
    }
}
