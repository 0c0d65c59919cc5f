//! `flottectl operator create | list | set-role | revoke | renew`: the
//! people and CI jobs that may call the admin API, and their roles. `create`
//! makes the new operator's key here (or takes their CSR) and writes a ready
//! profile directory; the private key is never sent to the server. `renew`
//! (also done by every command once a third of the certificate's lifetime
//! is left) sends a CSR for the profile's own key and replaces its
//! certificate atomically.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use flotte_common::key_request::{csr_for_key, generate_key_and_csr};
use flotte_common::profile::{Profile, ProfileSettings, PROFILE_FILE};
use flotte_common::roles::Role;
use flotte_proto::v1::operators_client::OperatorsClient;
use flotte_proto::v1::{
    CreateOperatorRequest, ListOperatorsRequest, OperatorInfo, RenewOperatorCertificateRequest,
    RevokeOperatorRequest, SetOperatorRoleRequest,
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
        /// The operator's name (their identity `operator/NAME`).
        name: String,
        /// viewer (read only), operator (rollouts, machines) or admin
        /// (everything, including access and operators).
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
    SetRole {
        /// The operator's name.
        name: String,
        /// viewer, operator or admin.
        role: Role,
    },
    /// Revoke an operator: every certificate refused and every connection
    /// closed at once. The name is never reused.
    Revoke {
        /// The operator's name.
        name: String,
    },
    /// Renew this profile's own certificate now (same key, new certificate;
    /// every command also does it once a third of the lifetime is left).
    Renew,
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

/// Renews `profile`'s certificate over mutual TLS with a CSR for its own key
/// and replaces the certificate in the profile directory atomically; returns
/// the operator as the server now records it.
pub async fn renew_profile(cli: &Cli, profile: &mut Profile) -> Result<OperatorInfo, CtlError> {
    let (channel, diagnostics) = cli.channel(profile)?;
    let renewed = OperatorsClient::new(channel)
        .renew_operator_certificate(RenewOperatorCertificateRequest {
            csr_pem: csr_for_key(&profile.key_pem)?,
        })
        .await
        .map_err(rpc_error(&diagnostics))?
        .into_inner();
    profile.replace_certificate(
        &cli.profile_dir()?,
        renewed.certificate_pem,
        renewed.ca_certificate_pem,
    )?;
    Ok(renewed.operator.unwrap_or_default())
}

/// `operator renew`: renews at once, whatever is left of the lifetime.
async fn renew_now(cli: &Cli) -> Result<(), CtlError> {
    let mut profile = cli.load_profile()?;
    let operator = renew_profile(cli, &mut profile).await?;
    if cli.output() == Output::Json {
        return print_json(&OperatorView::from(&operator));
    }
    print_line!(
        "certificate of {} renewed (serial {}), valid until {}; written to {}",
        operator.name,
        operator.certificate_serial,
        optional_time(operator.certificate_not_after).unwrap_or_default(),
        cli.profile_dir()?.display()
    );
    Ok(())
}

pub async fn run(cli: &Cli, command: &OperatorCommand) -> Result<(), CtlError> {
    if matches!(command, OperatorCommand::Renew) {
        return renew_now(cli).await;
    }
    let (channel, diagnostics) = cli.connect().await?;
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
        // Handled before dialing: it must not renew twice.
        OperatorCommand::Renew => return renew_now(cli).await,
    }
    Ok(())
}
