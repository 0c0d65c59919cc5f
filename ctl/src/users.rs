//! `flottectl user add | list | show | key add | key remove | revoke`: the
//! people who log into machines over SSH, and their keys. Keys are read and
//! checked here first (clearer errors, nothing sent for a typo); the server
//! validates them again. `revoke` is off-boarding: every grant, key and the
//! operator of the same name, in one call.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use flotte_proto::ssh_keys::parse_public_key;
use flotte_proto::v1::users_client::UsersClient;
use flotte_proto::v1::{
    AddUserKeyRequest, AddUserRequest, GetUserRequest, ListUsersRequest, RemoveUserKeyRequest,
    RevokeUserRequest, UserInfo,
};
use serde::Serialize;

use crate::access::{print_grant_rows, GrantView};
use crate::cli::{read_file, rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{
    active_or_revoked, optional_time, print_fields, print_json, print_line, print_list,
    print_table, Output,
};

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a person with their SSH public keys (.pub files).
    Add {
        /// The user's name.
        name: String,
        /// An SSH public key file (.pub); repeat for more.
        #[arg(long = "ssh-key", value_name = "FILE")]
        ssh_keys: Vec<PathBuf>,
    },
    /// List users, their keys and grants.
    List,
    /// One user, their keys and grants.
    Show {
        /// The user's name.
        name: String,
    },
    /// Add or remove one SSH key of a user.
    #[command(subcommand)]
    Key(UserKeyCommand),
    /// Off-boarding: remove every grant and key of the user and revoke the
    /// operator of the same name, in one call; the new policy is pushed to
    /// every connected machine at once.
    Revoke {
        /// The user's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserKeyCommand {
    /// Add one SSH public key to a user (pushed to machines at once).
    Add {
        /// The user's name.
        name: String,
        /// The SSH public key file (.pub).
        #[arg(long = "ssh-key", value_name = "FILE")]
        ssh_key: PathBuf,
    },
    /// Remove one SSH key of a user (removed from machines at once).
    Remove {
        /// The user's name.
        name: String,
        /// The key: its fingerprint (SHA256:…) or its .pub file.
        key: String,
    },
}

#[derive(Debug, Serialize)]
struct KeyView {
    key_type: String,
    fingerprint: String,
    comment: String,
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
fn read_public_key(path: &Path) -> Result<String, CtlError> {
    let text = read_file(path)?;
    parse_public_key(&text)
        .map_err(|error| CtlError::Usage(format!("{}: {error}", path.display())))?;
    Ok(text)
}

fn print_users(output: Output, users: &[UserInfo]) -> Result<(), CtlError> {
    let views: Vec<UserView> = users.iter().map(UserView::from).collect();
    print_list(
        output,
        &views,
        &["NAME", "STATE", "KEYS", "GRANTS", "CREATED BY"],
        |user| {
            vec![
                user.name.clone(),
                active_or_revoked(user.revoked_at.as_deref()),
                user.keys.len().to_string(),
                user.grants.len().to_string(),
                user.created_by.clone(),
            ]
        },
    )
}

fn print_user(output: Output, user: &UserInfo) -> Result<(), CtlError> {
    let view = UserView::from(user);
    if output == Output::Json {
        return print_json(&view);
    }
    print_fields(
        9,
        &[
            ("user", view.name.clone()),
            ("state", active_or_revoked(view.revoked_at.as_deref())),
            (
                "created",
                format!(
                    "{} by {}",
                    view.created_at.clone().unwrap_or_default(),
                    view.created_by
                ),
            ),
        ],
    );
    print_line!();
    print_line!("keys:");
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
    print_table(&["FINGERPRINT", "TYPE", "COMMENT"], &keys);
    print_line!();
    print_line!("grants:");
    print_grant_rows(&view.grants);
    Ok(())
}

pub async fn run(cli: &Cli, command: &UserCommand) -> Result<(), CtlError> {
    // Keys are read before dialing: a bad file is a usage error.
    let request_keys = match command {
        UserCommand::Add { ssh_keys, .. } => ssh_keys
            .iter()
            .map(|path| read_public_key(path))
            .collect::<Result<Vec<_>, _>>()?,
        UserCommand::Key(UserKeyCommand::Add { ssh_key, .. }) => vec![read_public_key(ssh_key)?],
        _ => Vec::new(),
    };
    let (channel, diagnostics) = cli.connect().await?;
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
            let key = match Path::new(key).is_file() {
                true => read_public_key(Path::new(key))?,
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
            print_line!(
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
