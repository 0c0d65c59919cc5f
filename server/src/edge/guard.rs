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
        arguments_json: arguments.to_string(),
        result,
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
        append_audit_entry(
            &self.state,
            self.actor(),
            self.role.as_str(),
            self.rpc,
            &self.arguments,
            result,
        )
        .await?;
        outcome
    }
}
