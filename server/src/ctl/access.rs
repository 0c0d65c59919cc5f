//! `flottectl user` and `flottectl access`: people and their SSH keys,
//! grants by selector, off-boarding, propagation status and the
//! who-has-access report. Keys are read and checked here first (clearer
//! errors, nothing sent for a typo); the server validates them again.

use std::path::PathBuf;

use clap::Subcommand;
use flotte_proto::ssh_keys::parse_public_key;
use flotte_proto::v1::access_client::AccessClient;
use flotte_proto::v1::users_client::UsersClient;
use flotte_proto::v1::{
    AccessReportRequest, AccessReportResponse, AccessStatusRequest, AccessStatusResponse,
    AddUserKeyRequest, AddUserRequest, GetUserRequest, GrantInfo, GrantRequest, ListGrantsRequest,
    ListUsersRequest, RemoveUserKeyRequest, RevokeGrantRequest, RevokeUserRequest, UserInfo,
};
use serde::Serialize;

use super::{
    connect, optional_time, print_json, read_file, render_table, rpc_error, Cli, CtlError, Output,
};

#[derive(Debug, Subcommand)]
pub(super) enum UserCommand {
    /// Add a person with their SSH public keys (.pub files).
    Add {
        name: String,
        #[arg(long = "ssh-key", value_name = "FILE")]
        ssh_keys: Vec<PathBuf>,
    },
    /// List users, their keys and grants.
    List,
    /// One user, their keys and grants.
    Show { name: String },
    /// Add or remove one SSH key of a user.
    #[command(subcommand)]
    Key(UserKeyCommand),
    /// Off-boarding: remove every grant and key of the user and revoke the
    /// operator of the same name, in one call; the new policy is pushed to
    /// every connected machine at once.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub(super) enum UserKeyCommand {
    Add {
        name: String,
        #[arg(long = "ssh-key", value_name = "FILE")]
        ssh_key: PathBuf,
    },
    /// KEY is a fingerprint (SHA256:…) or a .pub file.
    Remove { name: String, key: String },
}

#[derive(Debug, Subcommand)]
pub(super) enum AccessCommand {
    /// Let USER log in as LOGIN on the machines matching the selector.
    Grant {
        user: String,
        #[arg(long, default_value = "")]
        selector: String,
        #[arg(long)]
        login: String,
        /// RFC 3339 UTC time, e.g. 2027-01-31T00:00:00Z.
        #[arg(long, default_value = "")]
        expires: String,
    },
    /// Remove one grant.
    Revoke { grant: String },
    /// List grants (of one user with --user).
    List {
        #[arg(long, default_value = "")]
        user: String,
    },
    /// Which machines applied the access policy (the latest version, or V).
    Status {
        #[arg(long, default_value_t = 0)]
        version: u64,
    },
    /// Who can reach what: granted keys and the keys machines actually have.
    Report {
        #[arg(long, default_value = "", conflicts_with = "machine")]
        user: String,
        #[arg(long, default_value = "")]
        machine: String,
    },
}

#[derive(Debug, Serialize)]
struct KeyView {
    key_type: String,
    fingerprint: String,
    comment: String,
}

#[derive(Debug, Serialize)]
struct GrantView {
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

#[derive(Debug, Serialize)]
struct UserView {
    name: String,
    created_at: Option<String>,
    created_by: String,
    revoked_at: Option<String>,
    keys: Vec<KeyView>,
    grants: Vec<GrantView>,
}

impl From<&UserInfo> for UserView {
    fn from(user: &UserInfo) -> Self {
        UserView {
            name: user.name.clone(),
            created_at: optional_time(user.created_at),
            created_by: user.created_by.clone(),
            revoked_at: optional_time(user.revoked_at),
            keys: user
                .keys
                .iter()
                .map(|key| KeyView {
                    key_type: key.key_type.clone(),
                    fingerprint: key.fingerprint.clone(),
                    comment: key.comment.clone(),
                })
                .collect(),
            grants: user.grants.iter().map(GrantView::from).collect(),
        }
    }
}

/// Reads a `.pub` file and checks it here, naming the file in the error.
fn read_public_key(path: &std::path::Path) -> Result<String, CtlError> {
    let text = read_file(path)?;
    parse_public_key(&text)
        .map_err(|error| CtlError::Usage(format!("{}: {error}", path.display())))?;
    Ok(text)
}

fn print_users(output: Output, users: &[UserInfo]) -> Result<(), CtlError> {
    let views: Vec<UserView> = users.iter().map(UserView::from).collect();
    if output == Output::Json {
        return print_json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|user| {
            vec![
                user.name.clone(),
                user.revoked_at
                    .as_ref()
                    .map_or_else(|| "active".to_owned(), |at| format!("revoked {at}")),
                user.keys.len().to_string(),
                user.grants.len().to_string(),
                user.created_by.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(&["NAME", "STATE", "KEYS", "GRANTS", "CREATED BY"], &rows)
    );
    Ok(())
}

fn print_user(output: Output, user: &UserInfo) -> Result<(), CtlError> {
    let view = UserView::from(user);
    if output == Output::Json {
        return print_json(&view);
    }
    println!("user:     {}", view.name);
    println!(
        "state:    {}",
        view.revoked_at
            .as_ref()
            .map_or_else(|| "active".to_owned(), |at| format!("revoked {at}"))
    );
    println!(
        "created:  {} by {}",
        view.created_at.unwrap_or_default(),
        view.created_by
    );
    println!("\nkeys:");
    let keys: Vec<Vec<String>> = view
        .keys
        .iter()
        .map(|key| {
            vec![
                key.fingerprint.clone(),
                key.key_type.clone(),
                key.comment.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(&["FINGERPRINT", "TYPE", "COMMENT"], &keys)
    );
    println!("\ngrants:");
    print_grant_rows(&view.grants);
    Ok(())
}

fn print_grant_rows(grants: &[GrantView]) {
    let rows: Vec<Vec<String>> = grants
        .iter()
        .map(|grant| {
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
        })
        .collect();
    print!(
        "{}",
        render_table(
            &["ID", "USER", "LOGIN", "SELECTOR", "MACHINES", "EXPIRES"],
            &rows
        )
    );
}

fn print_grants(output: Output, grants: &[GrantInfo]) -> Result<(), CtlError> {
    let views: Vec<GrantView> = grants.iter().map(GrantView::from).collect();
    if output == Output::Json {
        return print_json(&views);
    }
    print_grant_rows(&views);
    Ok(())
}

#[derive(Debug, Serialize)]
struct StatusMachineView {
    machine_id: String,
    hostname: String,
    status: String,
    applied_version: u64,
    applied_at: Option<String>,
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
            })
            .collect(),
    };
    if output == Output::Json {
        return print_json(&view);
    }
    println!(
        "access policy version {} (current {}): {} applied, {} pending, {} unreachable",
        view.version, view.current_version, view.applied, view.pending, view.unreachable
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
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(&["ID", "HOSTNAME", "STATUS", "APPLIED", "AT"], &rows)
    );
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

#[derive(Debug, Serialize)]
struct ReportView {
    entries: Vec<ReportEntryView>,
    missing_logins: Vec<String>,
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
    print!(
        "{}",
        render_table(
            &[
                "MACHINE",
                "LOGIN",
                "USER",
                "FINGERPRINT",
                "STATE",
                "EXPIRES",
                "FOUND IN"
            ],
            &rows
        )
    );
    for missing in &view.missing_logins {
        println!("login missing on the machine: {missing}");
    }
    Ok(())
}

pub(super) async fn run_user(cli: &Cli, command: &UserCommand) -> Result<(), CtlError> {
    // Keys are read before dialing: a bad file is a usage error.
    let request_keys = match command {
        UserCommand::Add { ssh_keys, .. } => ssh_keys
            .iter()
            .map(|path| read_public_key(path))
            .collect::<Result<Vec<_>, _>>()?,
        UserCommand::Key(UserKeyCommand::Add { ssh_key, .. }) => vec![read_public_key(ssh_key)?],
        _ => Vec::new(),
    };
    let (channel, diagnostics) = connect(cli)?;
    let rpc = rpc_error(&diagnostics);
    let mut client = UsersClient::new(channel);
    let output = cli.output();
    match command {
        UserCommand::Add { name, .. } => {
            let user = client
                .add_user(AddUserRequest {
                    name: name.clone(),
                    ssh_keys: request_keys,
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_user(output, &user)
        }
        UserCommand::List => {
            let users = client
                .list_users(ListUsersRequest {})
                .await
                .map_err(&rpc)?
                .into_inner()
                .users;
            print_users(output, &users)
        }
        UserCommand::Show { name } => {
            let user = client
                .get_user(GetUserRequest { name: name.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_user(output, &user)
        }
        UserCommand::Key(UserKeyCommand::Add { name, .. }) => {
            let user = client
                .add_user_key(AddUserKeyRequest {
                    name: name.clone(),
                    ssh_key: request_keys.into_iter().next().unwrap_or_default(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_user(output, &user)
        }
        UserCommand::Key(UserKeyCommand::Remove { name, key }) => {
            // A path to a .pub file is sent as the key's text.
            let key = match std::path::Path::new(key).is_file() {
                true => read_public_key(std::path::Path::new(key))?,
                false => key.clone(),
            };
            let user = client
                .remove_user_key(RemoveUserKeyRequest {
                    name: name.clone(),
                    key,
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_user(output, &user)
        }
        UserCommand::Revoke { name } => {
            let revoked = client
                .revoke_user(RevokeUserRequest { name: name.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            if output == Output::Json {
                return print_json(&serde_json::json!({
                    "user": name,
                    "grants_removed": revoked.grants_removed,
                    "keys_removed": revoked.keys_removed,
                    "operator": revoked.operator,
                    "policy_version": revoked.policy_version,
                }));
            }
            println!(
                "user {name} revoked: {} grant(s) and {} key(s) removed; operator: {}; access policy version {} pushed to every connected machine (check: flottectl access status --version {})",
                revoked.grants_removed,
                revoked.keys_removed,
                revoked.operator,
                revoked.policy_version,
                revoked.policy_version
            );
            Ok(())
        }
    }
}

pub(super) async fn run_access(cli: &Cli, command: &AccessCommand) -> Result<(), CtlError> {
    let (channel, diagnostics) = connect(cli)?;
    let rpc = rpc_error(&diagnostics);
    let mut client = AccessClient::new(channel);
    let output = cli.output();
    match command {
        AccessCommand::Grant {
            user,
            selector,
            login,
            expires,
        } => {
            let grant = client
                .grant(GrantRequest {
                    user: user.clone(),
                    selector: selector.clone(),
                    login: login.clone(),
                    expires: expires.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_grants(output, std::slice::from_ref(&grant))
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
