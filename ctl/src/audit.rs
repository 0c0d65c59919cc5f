//! `flottectl audit list | verify`: the hash-chained record of every
//! mutating call. The chain is verified here, on the operator's machine,
//! with the same pure functions the server seals it with
//! (`flotte_common::audit`) and against the server's signed checkpoints
//! (`flotte_common::audit_checkpoints`) — so `audit verify` does not take
//! the server's word for it. Both commands page through the log, so any
//! size of log can be read; `verify` keeps only the previous entry.
//!
//! `verify` remembers the newest signed head it saw, with the audit key,
//! in the profile directory (`audit-head.json`), and fails when a later log
//! does not extend it (a truncation that also deleted checkpoints) or is
//! signed by another key.

use std::time::{Duration, SystemTime};

use std::path::{Path, PathBuf};

use clap::Subcommand;
use flotte_common::audit::{AuditEvent, AuditRecord};
use flotte_common::audit_checkpoints::{
    AuditCheckpoint, LogProblem, LogSummary, LogVerifier, SignedHead,
};
use flotte_proto::v1::audit_client::AuditClient;
use flotte_proto::v1::{AuditEntry, ListAuditRequest, ListAuditResponse};
use serde::Serialize;
use tonic::transport::Channel;

use crate::cli::{rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{format_time, print_json, print_line, print_list, Output};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit entries, oldest first.
    List {
        /// Only entries since this time: RFC 3339 (2025-01-31T12:00:00Z) or
        /// a duration ago (1h, 7days).
        #[arg(long)]
        since: Option<String>,
        /// Only entries by this operator name.
        #[arg(long)]
        actor: Option<String>,
    },
    /// Check the whole hash chain here, on this machine; exits non-zero and
    /// names the first broken entry if the log was changed.
    Verify,
}

/// `--since`: an RFC 3339 time, or a duration before now.
fn parse_since(text: &str, now: SystemTime) -> Result<i64, CtlError> {
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

pub(crate) fn record_of(entry: AuditEntry) -> AuditRecord {
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

/// The file in the profile directory holding the last signed head seen.
const REMEMBERED_HEAD_FILE: &str = "audit-head.json";

fn remembered_head_path(cli: &Cli) -> Result<PathBuf, CtlError> {
    Ok(cli.profile_dir()?.join(REMEMBERED_HEAD_FILE))
}

fn read_remembered_head(path: &Path) -> Result<Option<SignedHead>, CtlError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|error| {
            CtlError::AuditBroken(format!(
                "{}: not a remembered audit head ({error}); remove it to start trusting anew",
                path.display()
            ))
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CtlError::ReadFile {
            path: path.to_owned(),
            source,
        }),
    }
}

fn checkpoint_of(checkpoint: flotte_proto::v1::AuditCheckpoint) -> AuditCheckpoint {
    AuditCheckpoint {
        seq: checkpoint.seq,
        head_hash: checkpoint.head_hash,
        at: checkpoint.at,
        key_id: checkpoint.key_id,
        signature: checkpoint.signature,
    }
}

/// Asks for every page of `request`, handing each to `page` (the log may
/// be of any size: one answer holds at most one page).
pub(crate) async fn each_page<E>(
    client: &mut AuditClient<Channel>,
    rpc: &impl Fn(tonic::Status) -> E,
    mut request: ListAuditRequest,
    mut page: impl FnMut(ListAuditResponse) -> Result<(), E>,
) -> Result<(), E> {
    loop {
        let response = client
            .list_audit(request.clone())
            .await
            .map_err(rpc)?
            .into_inner();
        let more = response.more;
        let last = response.entries.last().map(|entry| entry.seq);
        page(response)?;
        match (more, last) {
            (true, Some(last)) if last > request.after_seq => request.after_seq = last,
            _ => return Ok(()),
        }
    }
}

/// Checks one page: the key (on the first), its checkpoints, its entries.
fn verify_page(
    verifier: &mut Option<LogVerifier>,
    remembered: Option<&SignedHead>,
    page: ListAuditResponse,
) -> Result<(), LogProblem> {
    let verifier = match verifier {
        Some(verifier) => verifier,
        None => verifier.insert(LogVerifier::new(
            &page.audit_public_key,
            remembered.cloned(),
        )?),
    };
    verifier.add_checkpoints(page.checkpoints.into_iter().map(checkpoint_of))?;
    for entry in page.entries {
        verifier.push_entry(&record_of(entry))?;
    }
    Ok(())
}

pub async fn run(cli: &Cli, command: &AuditCommand) -> Result<(), CtlError> {
    let (channel, diagnostics) = cli.connect().await?;
    let rpc = rpc_error(&diagnostics);
    let mut client = AuditClient::new(channel);
    match command {
        AuditCommand::List { since, actor } => {
            let request = ListAuditRequest {
                since: since
                    .as_deref()
                    .map(|since| parse_since(since, SystemTime::now()))
                    .transpose()?
                    .unwrap_or(0),
                actor: actor.clone().unwrap_or_default(),
                ..ListAuditRequest::default()
            };
            let mut entries = Vec::new();
            each_page(&mut client, &rpc, request, |page| {
                entries.extend(page.entries.into_iter().map(record_of));
                Ok(())
            })
            .await?;
            print_audit(cli.output(), entries)
        }
        AuditCommand::Verify => {
            let remembered_path = remembered_head_path(cli)?;
            let remembered = read_remembered_head(&remembered_path)?;
            let mut verifier: Option<LogVerifier> = None;
            let mut problem = None;
            each_page(&mut client, &rpc, ListAuditRequest::default(), |page| {
                if problem.is_some() {
                    return Ok(());
                }
                let outcome = verify_page(&mut verifier, remembered.as_ref(), page);
                problem = outcome.err();
                Ok(())
            })
            .await?;
            let outcome = match (problem, verifier) {
                (Some(problem), _) => Err(problem),
                (None, Some(verifier)) => verifier.finish(),
                (None, None) => Ok(LogSummary {
                    entries: 0,
                    head_hash: flotte_common::audit::GENESIS_HASH.to_owned(),
                    checkpoints: 0,
                    signed_head: remembered.clone(),
                }),
            };
            verify(cli.output(), outcome, &remembered_path, remembered.as_ref())
        }
    }
}

fn print_audit(output: Output, entries: Vec<AuditRecord>) -> Result<(), CtlError> {
    let views: Vec<AuditView> = entries.into_iter().map(AuditView::from).collect();
    print_list(
        output,
        &views,
        &[
            "SEQ",
            "TIME",
            "ACTOR",
            "ROLE",
            "ACTION",
            "ARGUMENTS",
            "RESULT",
        ],
        |entry| {
            vec![
                entry.seq.to_string(),
                entry.at.clone(),
                entry.actor.clone(),
                entry.role.clone(),
                entry.action.clone(),
                entry.arguments.to_string(),
                entry.result.clone(),
            ]
        },
    )
}

fn verify(
    output: Output,
    outcome: Result<LogSummary, LogProblem>,
    remembered_path: &Path,
    remembered: Option<&SignedHead>,
) -> Result<(), CtlError> {
    #[derive(Serialize)]
    struct Verdict {
        intact: bool,
        entries: u64,
        head_hash: Option<String>,
        checkpoints: u64,
        /// The newest signed entry (what later logs must extend).
        signed_up_to: Option<u64>,
        broken_at: Option<u64>,
        reason: Option<String>,
    }
    let verdict = match &outcome {
        Ok(summary) => Verdict {
            intact: true,
            entries: summary.entries,
            head_hash: Some(summary.head_hash.clone()),
            checkpoints: summary.checkpoints,
            signed_up_to: summary.signed_head.as_ref().map(|head| head.seq),
            broken_at: None,
            reason: None,
        },
        Err(problem) => Verdict {
            intact: false,
            entries: 0,
            head_hash: None,
            checkpoints: 0,
            signed_up_to: None,
            broken_at: problem.seq(),
            reason: Some(problem.to_string()),
        },
    };
    if let Ok(summary) = &outcome {
        if let Some(head) = &summary.signed_head {
            if Some(head) != remembered {
                let text = serde_json::to_vec_pretty(head)?;
                flotte_proto::files::write_atomically_with_mode(remembered_path, &text, 0o600)
                    .map_err(|source| CtlError::WriteFile {
                        path: remembered_path.to_owned(),
                        source,
                    })?;
            }
        }
    }
    if output == Output::Json {
        print_json(&verdict)?;
    } else if let Some(head) = &verdict.head_hash {
        let signed = match verdict.signed_up_to {
            Some(seq) => format!(
                "{} checkpoints verified, signed up to entry {seq} (remembered in {})",
                verdict.checkpoints,
                remembered_path.display()
            ),
            None => "no signed checkpoint yet".to_owned(),
        };
        print_line!(
            "audit log intact: {} entries, head sha256 {head}; {signed}",
            verdict.entries
        );
    }
    match (verdict.broken_at, verdict.reason) {
        (Some(seq), Some(reason)) => Err(CtlError::AuditBroken(format!(
            "audit log broken at entry {seq}: {reason}"
        ))),
        (None, Some(reason)) => Err(CtlError::AuditBroken(format!(
            "audit log refused: {reason}"
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
