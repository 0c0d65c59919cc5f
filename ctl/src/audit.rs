//! `flottectl audit list | verify`: the hash-chained record of every
//! mutating call. The chain is verified here, on the operator's machine,
//! with the same pure function the server seals it with
//! (`flotte_common::audit`) — so `audit verify` does not take the server's
//! word for it.

use std::time::{Duration, SystemTime};

use clap::Subcommand;
use flotte_common::audit::{verify_chain, AuditEvent, AuditRecord};
use flotte_proto::v1::audit_client::AuditClient;
use flotte_proto::v1::{AuditEntry, ListAuditRequest};
use serde::Serialize;

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

pub async fn run(cli: &Cli, command: &AuditCommand) -> Result<(), CtlError> {
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
    let (channel, diagnostics) = cli.connect().await?;
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
        print_line!(
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
