//! The gate every admin RPC passes through: the caller must be an operator
//! identity, not revoked, known to the store, with a role the policy table
//! (`roles`) allows for this RPC — and a mutating call is written to the
//! audit log, whatever its outcome, before it answers.
//!
//! Handlers call [`admit`] first and hand their work to [`AdminCall::run`],
//! which runs it in its own task: a client that hangs up mid-call cannot
//! leave a change done but unrecorded.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::edge::auth::{
    authorize_operator, require_not_revoked, require_operator, AuthError, Caller,
};
use crate::ServerState;
use flotte_common::audit::AuditEvent;
use flotte_common::roles::{AdminRpc, Role};

/// An admitted admin call: who made it, with which role.
#[derive(Debug)]
pub struct AdminCall {
    state: Arc<ServerState>,
    rpc: AdminRpc,
    pub caller: Caller,
    pub role: Role,
    arguments: serde_json::Value,
}

/// The role of a caller, if the store knows the operator, and the decision.
async fn decide(
    state: &ServerState,
    caller: &Caller,
    rpc: AdminRpc,
) -> Result<(Option<Role>, Result<Role, AuthError>), Status> {
    if let Err(refusal) = require_not_revoked(caller, &state.revocations) {
        return Ok((None, Err(refusal)));
    }
    let operator = state.store.operator(&caller.identity.name).await?;
    let known_role = operator
        .as_ref()
        .filter(|operator| operator.revoked_at.is_none())
        .map(|operator| operator.role);
    Ok((
        known_role,
        authorize_operator(caller, operator.as_ref(), rpc),
    ))
}

/// Arguments kept whole in an audit entry up to this size; past it, a prefix,
/// the size and the SHA-256 of the whole. A refused call's arguments cost its
/// caller nothing, so without a bound a viewer could grow every entry to the
/// message limit and make the log unreadable (`audit list`, `audit verify`).
const MAX_AUDITED_ARGUMENTS_BYTES: usize = 4096;
/// The same for an entry's result (an error may quote what it refused).
const MAX_AUDITED_RESULT_BYTES: usize = 1024;
/// How much of an oversized value an entry keeps.
const AUDITED_PREFIX_BYTES: usize = 256;

/// `text` cut to at most `max` bytes on a character boundary.
fn prefix_of(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn sha256_hex(text: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

/// A call's arguments as audited: whole when small, else a JSON summary.
fn bounded_arguments(arguments_json: String) -> String {
    if arguments_json.len() <= MAX_AUDITED_ARGUMENTS_BYTES {
        return arguments_json;
    }
    serde_json::json!({
        "truncated": true,
        "bytes": arguments_json.len(),
        "sha256": sha256_hex(&arguments_json),
        "prefix": prefix_of(&arguments_json, AUDITED_PREFIX_BYTES),
    })
    .to_string()
}

/// A call's result as audited: whole when small, else a prefix and a summary.
fn bounded_result(result: String) -> String {
    if result.len() <= MAX_AUDITED_RESULT_BYTES {
        return result;
    }
    format!(
        "{}… ({} bytes in all, sha256 {})",
        prefix_of(&result, AUDITED_PREFIX_BYTES),
        result.len(),
        sha256_hex(&result)
    )
}

/// Appends one audit entry for `rpc`, turning a failure into a status that
/// says the action's outcome stands but was not recorded.
pub async fn append_audit_entry(
    state: &ServerState,
    actor: &str,
    role: &str,
    rpc: AdminRpc,
    arguments: &serde_json::Value,
    result: String,
) -> Result<(), Status> {
    let event = AuditEvent {
        at: state.clock.now_unix(),
        actor: actor.to_owned(),
        role: role.to_owned(),
        action: rpc.policy().action.to_owned(),
        arguments_json: bounded_arguments(arguments.to_string()),
        result: bounded_result(result),
    };
    match state.store.append_audit(&event).await {
        Ok(_) => Ok(()),
        Err(error) => {
            tracing::error!(%error, action = %event.action, actor, "audit log append failed");
            Err(Status::internal(format!(
                "{} ({}) was not recorded in the audit log: {error}",
                event.action, event.result
            )))
        }
    }
}

/// Admits a call to `rpc`, or refuses it (a refused mutating call by an
/// operator identity is audited as `denied`). `arguments` are the call's
/// arguments for the audit log: never put a secret in them.
pub async fn admit<T>(
    state: &Arc<ServerState>,
    request: &Request<T>,
    rpc: AdminRpc,
    arguments: serde_json::Value,
) -> Result<AdminCall, Status> {
    // Without an operator certificate there is no actor to record: such
    // calls are refused and logged, not audited (anyone could flood the log).
    let caller = require_operator(request)?;
    let (known_role, decision) = decide(state, &caller, rpc).await?;
    match decision {
        Ok(role) => Ok(AdminCall {
            state: Arc::clone(state),
            rpc,
            caller,
            role,
            arguments,
        }),
        Err(refusal) => {
            tracing::warn!(operator = %caller.identity, method = rpc.policy().method_path, %refusal, "admin call refused");
            let status = Status::from(refusal);
            if rpc.policy().mutating {
                append_audit_entry(
                    state,
                    &caller.identity.name,
                    known_role.map_or("none", Role::as_str),
                    rpc,
                    &arguments,
                    format!("denied: {}", status.message()),
                )
                .await?;
            }
            Err(status)
        }
    }
}

impl AdminCall {
    /// The operator's name, for logs and records.
    pub fn actor(&self) -> &str {
        &self.caller.identity.name
    }

    /// Runs the call's work and answers; a mutating call's outcome is
    /// appended to the audit log first (`detail` summarises a success, e.g.
    /// the id it created). The work and the append run in a task of their
    /// own, so dropping the RPC (client gone) does not cut them short.
    pub async fn run<R, Work>(
        self,
        work: Work,
        detail: impl FnOnce(&R) -> String + Send + 'static,
    ) -> Result<Response<R>, Status>
    where
        R: Send + 'static,
        Work: std::future::Future<Output = Result<R, Status>> + Send + 'static,
    {
        let task = tokio::spawn(async move {
            let outcome = work.await;
            self.record(outcome, detail).await
        });
        match task.await {
            Ok(answer) => answer.map(Response::new),
            Err(error) => Err(Status::internal(format!("admin call failed: {error}"))),
        }
    }

    async fn record<R>(
        self,
        outcome: Result<R, Status>,
        detail: impl FnOnce(&R) -> String,
    ) -> Result<R, Status> {
        if !self.rpc.policy().mutating {
            return outcome;
        }
        let result = match &outcome {
            Ok(response) => match detail(response) {
                detail if detail.is_empty() => "ok".to_owned(),
                detail => format!("ok: {detail}"),
            },
            Err(status) => format!("failed: {:?}: {}", status.code(), status.message()),
        };
        let appended = append_audit_entry(
            &self.state,
            self.actor(),
            self.role.as_str(),
            self.rpc,
            &self.arguments,
            result,
        )
        .await;
        match (outcome, appended) {
            (outcome, Ok(())) => outcome,
            // A call that changed something must say it went unaudited.
            (Ok(_), Err(unaudited)) => Err(unaudited),
            // A call that failed says why first (often the same cause,
            // e.g. a full disk, made the audit append fail too).
            (Err(failed), Err(_)) => Err(Status::new(
                failed.code(),
                format!(
                    "{} (this failure was not recorded in the audit log either)",
                    failed.message()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn small_values_are_audited_whole_and_large_ones_summarised() {
        let small = serde_json::json!({ "name": "bob" }).to_string();
        assert_eq!(bounded_arguments(small.clone()), small);
        assert_eq!(bounded_result("ok".into()), "ok");

        // A multi-megabyte argument with a multi-byte character at the cut.
        let huge = serde_json::json!({ "plan": "é".repeat(2 * 1024 * 1024) }).to_string();
        let audited = bounded_arguments(huge.clone());
        assert!(audited.len() < 1024, "{} bytes kept", audited.len());
        let summary: serde_json::Value = serde_json::from_str(&audited).unwrap();
        assert_eq!(summary["truncated"], true);
        assert_eq!(summary["bytes"], huge.len());
        assert_eq!(summary["sha256"], sha256_hex(&huge));
        assert!(huge.starts_with(summary["prefix"].as_str().unwrap()));

        let long_error = format!("denied: {}", "x".repeat(100_000));
        let audited = bounded_result(long_error.clone());
        assert!(audited.len() < 1024, "{audited}");
        assert!(audited.starts_with("denied: xxx") && audited.contains("100008 bytes in all"));
    }
}
