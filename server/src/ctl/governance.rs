//! `flottectl operator`, `image trust` and `audit`: who may act, which
//! release keys are trusted, and the record of what was done. The audit
//! chain is verified here, on the operator's machine, with the same pure
//! function the server seals it with — so `audit verify` does not take the
//! server's word for it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use flotte_proto::v1::audit_client::AuditClient;
use flotte_proto::v1::operators_client::OperatorsClient;
use flotte_proto::v1::release_keys_client::ReleaseKeysClient;
use flotte_proto::v1::{
    AddReleaseKeyRequest, AuditEntry, CreateOperatorRequest, ListAuditRequest,
    ListOperatorsRequest, ListReleaseKeysRequest, OperatorInfo, ReleaseKey,
    RemoveReleaseKeyRequest, RevokeOperatorRequest, SetOperatorRoleRequest,
};
use serde::Serialize;

use super::{
    connect, format_time, load_profile, optional_time, print_json, read_file, render_table,
    rpc_error, server_address, AuditCommand, Cli, CtlError, OperatorCommand, Output, TrustCommand,
};
use crate::audit::{verify_chain, AuditEvent, AuditRecord};
use crate::ca::generate_key_and_csr;
use crate::profile::{Profile, ProfileSettings, PROFILE_FILE};

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
    if output == Output::Json {
        return print_json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|operator| {
            vec![
                operator.name.clone(),
                operator.role.clone(),
                operator
                    .revoked_at
                    .as_ref()
                    .map_or_else(|| "active".to_owned(), |at| format!("revoked {at}")),
                operator.created_by.clone(),
                operator
                    .certificate_expires_at
                    .clone()
                    .unwrap_or_else(|| "never".into()),
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(
            &["NAME", "ROLE", "STATE", "CREATED BY", "CERTIFICATE EXPIRES"],
            &rows
        )
    );
    Ok(())
}

/// Creates an operator and writes their profile directory.
async fn create_operator(
    cli: &Cli,
    client: &mut OperatorsClient<tonic::transport::Channel>,
    rpc: &impl Fn(tonic::Status) -> CtlError,
    name: &str,
    role: crate::roles::Role,
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
    let address = server_address(cli, &load_profile(cli)?);
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
    println!(
        "operator {} ({}) created; profile written to {}",
        info.name,
        info.role,
        directory.display()
    );
    if key_pem.is_some() {
        eprintln!(
            "hand the directory to {} over a private channel: its key.pem is their credential",
            info.name
        );
    } else {
        eprintln!(
            "{} adds the key.pem that made the CSR to this directory",
            info.name
        );
    }
    Ok(())
}

pub(super) async fn run_operator(cli: &Cli, command: &OperatorCommand) -> Result<(), CtlError> {
    let (channel, diagnostics) = connect(cli)?;
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

#[derive(Debug, Serialize)]
struct ReleaseKeyView {
    id: String,
    name: String,
    public_key_base64: String,
    openssh: String,
    added_at: Option<String>,
    added_by: String,
}

impl From<&ReleaseKey> for ReleaseKeyView {
    fn from(key: &ReleaseKey) -> Self {
        ReleaseKeyView {
            id: key.id.clone(),
            name: key.name.clone(),
            public_key_base64: key.public_key_base64.clone(),
            openssh: key.openssh.clone(),
            added_at: optional_time(key.added_at),
            added_by: key.added_by.clone(),
        }
    }
}

/// Characters of a key id shown in tables (enough to name it uniquely).
const SHORT_KEY_ID: usize = 16;

fn print_release_keys(output: Output, keys: &[ReleaseKey]) -> Result<(), CtlError> {
    let views: Vec<ReleaseKeyView> = keys.iter().map(ReleaseKeyView::from).collect();
    if output == Output::Json {
        return print_json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|key| {
            vec![
                key.id.chars().take(SHORT_KEY_ID).collect(),
                key.name.clone(),
                key.public_key_base64.clone(),
                key.added_by.clone(),
                key.added_at.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(&["ID", "NAME", "PUBLIC KEY", "ADDED BY", "ADDED"], &rows)
    );
    Ok(())
}

pub(super) async fn run_trust(cli: &Cli, command: &TrustCommand) -> Result<(), CtlError> {
    // Read the file before dialing, so that a wrong path needs no round trip.
    let key_text = match command {
        TrustCommand::Add { key_file, .. } => Some(read_file(key_file)?),
        _ => None,
    };
    let (channel, diagnostics) = connect(cli)?;
    let rpc = rpc_error(&diagnostics);
    let mut client = ReleaseKeysClient::new(channel);
    let keys = match command {
        TrustCommand::Add { name, .. } => vec![client
            .add_release_key(AddReleaseKeyRequest {
                key_text: key_text.unwrap_or_default(),
                name: name.clone(),
            })
            .await
            .map_err(&rpc)?
            .into_inner()],
        TrustCommand::Remove { key } => vec![client
            .remove_release_key(RemoveReleaseKeyRequest { key: key.clone() })
            .await
            .map_err(&rpc)?
            .into_inner()],
        TrustCommand::List => {
            client
                .list_release_keys(ListReleaseKeysRequest {})
                .await
                .map_err(&rpc)?
                .into_inner()
                .keys
        }
    };
    print_release_keys(cli.output(), &keys)
}

/// `--since`: an RFC 3339 time, or a duration before now.
pub fn parse_since(text: &str, now: SystemTime) -> Result<i64, CtlError> {
    let time = match humantime::parse_rfc3339_weak(text) {
        Ok(time) => time,
        Err(_) => {
            let ago = humantime::parse_duration(text).map_err(|_| {
                CtlError::Usage(format!(
                    "--since {text:?}: expected an RFC 3339 time (2025-01-31T12:00:00Z) or a duration (1h, 7days)"
                ))
            })?;
            now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH)
        }
    };
    Ok(time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
        .try_into()
        .unwrap_or(i64::MAX))
}

fn record_of(entry: AuditEntry) -> AuditRecord {
    AuditRecord {
        seq: entry.seq,
        event: AuditEvent {
            at: entry.at,
            actor: entry.actor,
            role: entry.role,
            action: entry.action,
            arguments_json: entry.arguments_json,
            result: entry.result,
        },
        previous_hash: entry.previous_hash,
        hash: entry.hash,
    }
}

#[derive(Debug, Serialize)]
struct AuditView {
    seq: u64,
    at: String,
    actor: String,
    role: String,
    action: String,
    arguments: serde_json::Value,
    result: String,
    previous_hash: String,
    hash: String,
}

impl From<AuditRecord> for AuditView {
    fn from(record: AuditRecord) -> Self {
        let event = record.event;
        AuditView {
            seq: record.seq,
            at: format_time(event.at),
            arguments: serde_json::from_str(&event.arguments_json)
                .unwrap_or(serde_json::Value::String(event.arguments_json)),
            actor: event.actor,
            role: event.role,
            action: event.action,
            result: event.result,
            previous_hash: record.previous_hash,
            hash: record.hash,
        }
    }
}

pub(super) async fn run_audit(cli: &Cli, command: &AuditCommand) -> Result<(), CtlError> {
    let request = match command {
        AuditCommand::List { since, actor } => ListAuditRequest {
            since: since
                .as_deref()
                .map(|since| parse_since(since, SystemTime::now()))
                .transpose()?
                .unwrap_or(0),
            actor: actor.clone().unwrap_or_default(),
        },
        // Verification needs the whole chain.
        AuditCommand::Verify => ListAuditRequest::default(),
    };
    let (channel, diagnostics) = connect(cli)?;
    let rpc = rpc_error(&diagnostics);
    let entries: Vec<AuditRecord> = AuditClient::new(channel)
        .list_audit(request)
        .await
        .map_err(&rpc)?
        .into_inner()
        .entries
        .into_iter()
        .map(record_of)
        .collect();
    match command {
        AuditCommand::List { .. } => print_audit(cli.output(), entries),
        AuditCommand::Verify => verify(cli.output(), &entries),
    }
}

fn print_audit(output: Output, entries: Vec<AuditRecord>) -> Result<(), CtlError> {
    let views: Vec<AuditView> = entries.into_iter().map(AuditView::from).collect();
    if output == Output::Json {
        return print_json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|entry| {
            vec![
                entry.seq.to_string(),
                entry.at.clone(),
                entry.actor.clone(),
                entry.role.clone(),
                entry.action.clone(),
                entry.arguments.to_string(),
                entry.result.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(
            &[
                "SEQ",
                "TIME",
                "ACTOR",
                "ROLE",
                "ACTION",
                "ARGUMENTS",
                "RESULT"
            ],
            &rows
        )
    );
    Ok(())
}

fn verify(output: Output, entries: &[AuditRecord]) -> Result<(), CtlError> {
    #[derive(Serialize)]
    struct Verdict {
        intact: bool,
        entries: usize,
        head_hash: Option<String>,
        broken_at: Option<u64>,
        reason: Option<String>,
    }
    let verdict = match verify_chain(entries) {
        Ok(summary) => Verdict {
            intact: true,
            entries: entries.len(),
            head_hash: Some(summary.head_hash),
            broken_at: None,
            reason: None,
        },
        Err(broken) => Verdict {
            intact: false,
            entries: entries.len(),
            head_hash: None,
            broken_at: Some(broken.seq()),
            reason: Some(broken.to_string()),
        },
    };
    if output == Output::Json {
        print_json(&verdict)?;
    } else if let Some(head) = &verdict.head_hash {
        println!(
            "audit log intact: {} entries, head sha256 {head} (record it elsewhere: a chain cannot show its own truncation)",
            verdict.entries
        );
    }
    match (verdict.broken_at, verdict.reason) {
        (Some(seq), Some(reason)) => Err(CtlError::AuditBroken(format!(
            "audit log broken at entry {seq}: {reason}"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_a_duration_ago() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(parse_since("1h", now).unwrap(), 10_000 - 3_600);
        assert_eq!(parse_since("1970-01-01T01:00:00Z", now).unwrap(), 3_600);
        assert!(parse_since("yesterday-ish", now).is_err());
    }
}
