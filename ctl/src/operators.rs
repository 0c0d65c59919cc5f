//! `flottectl operator create | list | set-role | revoke`: the people and CI
//! jobs that may call the admin API, and their roles. `create` makes the new
//! operator's key here (or takes their CSR) and writes a ready profile
//! directory; the private key is never sent to the server.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use flotte_common::key_request::generate_key_and_csr;
use flotte_common::profile::{Profile, ProfileSettings, PROFILE_FILE};
use flotte_common::roles::Role;
use flotte_proto::v1::operators_client::OperatorsClient;
use flotte_proto::v1::{
    CreateOperatorRequest, ListOperatorsRequest, OperatorInfo, RevokeOperatorRequest,
    SetOperatorRoleRequest,
};
use serde::Serialize;

use crate::cli::{read_file, rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{
    active_or_revoked, note_line, optional_time, print_json, print_line, print_list, Output,
};

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
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

#[derive(Debug, Serialize)]
struct OperatorView {
    name: String,
    role: String,
    identity: String,
    created_at: Option<String>,
    created_by: String,
    certificate_serial: String,
    certificate_expires_at: Option<String>,
    revoked_at: Option<String>,
}

impl From<&OperatorInfo> for OperatorView {
    fn from(info: &OperatorInfo) -> Self {
        OperatorView {
            name: info.name.clone(),
            role: info.role.clone(),
            identity: info.identity_uri.clone(),
            created_at: optional_time(info.created_at),
            created_by: info.created_by.clone(),
            certificate_serial: info.certificate_serial.clone(),
            certificate_expires_at: optional_time(info.certificate_not_after),
            revoked_at: optional_time(info.revoked_at),
        }
    }
}

fn print_operators(output: Output, operators: &[OperatorInfo]) -> Result<(), CtlError> {
    let views: Vec<OperatorView> = operators.iter().map(OperatorView::from).collect();
    print_list(
        output,
        &views,
        &["NAME", "ROLE", "STATE", "CREATED BY", "CERTIFICATE EXPIRES"],
        |operator| {
            vec![
                operator.name.clone(),
                operator.role.clone(),
                active_or_revoked(operator.revoked_at.as_deref()),
                operator.created_by.clone(),
                operator
                    .certificate_expires_at
                    .clone()
                    .unwrap_or_else(|| "never".into()),
            ]
        },
    )
}

/// Creates an operator and writes their profile directory.
async fn create_operator(
    cli: &Cli,
    client: &mut OperatorsClient<tonic::transport::Channel>,
    rpc: &impl Fn(tonic::Status) -> CtlError,
    name: &str,
    role: Role,
    out: Option<&Path>,
    csr: Option<&Path>,
) -> Result<(), CtlError> {
    let directory = out.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    // Never overwrite a profile: it may be the admin's own.
    if directory.join(PROFILE_FILE).exists() {
        return Err(CtlError::Usage(format!(
            "{} already holds a profile; choose another --out",
            directory.display()
        )));
    }
    let (key_pem, csr_pem) = match csr {
        Some(path) => (None, read_file(path)?),
        None => {
            let (key_pem, csr_pem) = generate_key_and_csr()?;
            (Some(key_pem), csr_pem)
        }
    };
    let created = client
        .create_operator(CreateOperatorRequest {
            name: name.to_owned(),
            role: role.to_string(),
            csr_pem,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    // The new profile dials the server this admin dials.
    let address = cli.server_address(&cli.load_profile()?);
    let profile = Profile {
        settings: ProfileSettings {
            server: address,
            identity: created.identity_uri.clone(),
        },
        ca_pem: created.ca_certificate_pem,
        certificate_pem: created.certificate_pem,
        key_pem: key_pem.clone().unwrap_or_default(),
    };
    if key_pem.is_some() {
        profile.write(&directory)?;
    } else {
        profile.write_without_key(&directory)?;
    }
    let info = created.operator.unwrap_or_default();
    if cli.output() == Output::Json {
        #[derive(Serialize)]
        struct Created {
            #[serde(flatten)]
            operator: OperatorView,
            profile: String,
        }
        return print_json(&Created {
            operator: OperatorView::from(&info),
            profile: directory.display().to_string(),
        });
    }
    print_line!(
        "operator {} ({}) created; profile written to {}",
        info.name,
        info.role,
        directory.display()
    );
    if key_pem.is_some() {
        note_line!(
            "hand the directory to {} over a private channel: its key.pem is their credential",
            info.name
        );
    } else {
        note_line!(
            "{} adds the key.pem that made the CSR to this directory",
            info.name
        );
    }
    Ok(())
}

pub async fn run(cli: &Cli, command: &OperatorCommand) -> Result<(), CtlError> {
    let (channel, diagnostics) = cli.connect()?;
    let rpc = rpc_error(&diagnostics);
    let mut client = OperatorsClient::new(channel);
    match command {
        OperatorCommand::Create {
            name,
            role,
            out,
            csr,
        } => {
            create_operator(
                cli,
                &mut client,
                &rpc,
                name,
                *role,
                out.as_deref(),
                csr.as_deref(),
            )
            .await?;
        }
        OperatorCommand::List => {
            let operators = client
                .list_operators(ListOperatorsRequest {})
                .await
                .map_err(&rpc)?
                .into_inner()
                .operators;
            print_operators(cli.output(), &operators)?;
        }
        OperatorCommand::SetRole { name, role } => {
            let operator = client
                .set_operator_role(SetOperatorRoleRequest {
                    name: name.clone(),
                    role: role.to_string(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_operators(cli.output(), &[operator])?;
        }
        OperatorCommand::Revoke { name } => {
            let operator = client
                .revoke_operator(RevokeOperatorRequest { name: name.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_operators(cli.output(), &[operator])?;
        }
    }
    Ok(())
}
