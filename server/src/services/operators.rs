//! Operators: people with a role, created from a CSR (the private key is made
//! where `flottectl` runs and never reaches the server), re-roled and revoked
//! — which denies their identity and closes their connections at once. The
//! fleet is never left without an active admin.

use flotte_proto::identity::{is_valid_segment, Identity, SEGMENT_GRAMMAR};
use flotte_proto::names::quoted_prefix;

use crate::ca::{CaError, IssuedCertificate};
use crate::clock::to_unix;
use crate::live::feed::Change;
use crate::live::revocation::{denial, REVOCATION_GRACE};
use crate::store::{DeniedKind, OperatorChange, OperatorRecord, StoreError};
use crate::ServerState;
use flotte_common::roles::Role;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("operator name {} {SEGMENT_GRAMMAR}", quoted_prefix(.0))]
    InvalidName(String),
    #[error("{0}")]
    InvalidRole(String),
    #[error("no operator named {0}")]
    NotFound(String),
    #[error("operator {name} was revoked at {}", crate::store::rfc3339(*.at))]
    Revoked { name: String, at: i64 },
    #[error("operator {0} already exists (names of revoked operators are not reused)")]
    AlreadyExists(String),
    #[error("{0} is the last admin: create or promote another admin first")]
    LastAdmin(String),
    #[error("{0}")]
    BadCsr(String),
    #[error(transparent)]
    Ca(CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An operator to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOperator {
    pub name: String,
    pub role: String,
    pub csr_pem: String,
}

fn parse_role(text: &str) -> Result<Role, OperatorError> {
    text.parse::<Role>()
        .map_err(|error| OperatorError::InvalidRole(error.to_string()))
}

/// The stored operator `name`, refusing unknown and revoked ones.
async fn active_operator(state: &ServerState, name: &str) -> Result<OperatorRecord, OperatorError> {
    let operator = state
        .store
        .operator(name)
        .await?
        .ok_or_else(|| OperatorError::NotFound(name.to_owned()))?;
    if let Some(revoked_at) = operator.revoked_at {
        return Err(OperatorError::Revoked {
            name: name.to_owned(),
            at: revoked_at,
        });
    }
    Ok(operator)
}

/// The operator a store change left, or why there is none. The store
/// refuses, in the same transaction, to remove the last active admin: nobody
/// could then manage operators, tokens or revocation without a new `init`.
fn changed_operator(change: OperatorChange, name: &str) -> Result<OperatorRecord, OperatorError> {
    match change {
        OperatorChange::Changed(operator) => Ok(operator),
        OperatorChange::NotFound => Err(OperatorError::NotFound(name.to_owned())),
        OperatorChange::LastAdmin(_) => Err(OperatorError::LastAdmin(name.to_owned())),
    }
}

/// Issues an operator certificate for `identity` from a CSR's public key,
/// lasting `operator_certificate_ttl` (90 days unless configured):
/// certificates of people are long-lived, revocation is what ends them early.
fn issue_operator_certificate(
    state: &ServerState,
    identity: &Identity,
    csr_pem: &str,
) -> Result<IssuedCertificate, OperatorError> {
    state
        .ca
        .issue_client_from_csr(csr_pem, identity, state.config.operator_certificate_ttl)
        .map_err(|error| match error {
            CaError::BadCsr(_) => OperatorError::BadCsr(error.to_string()),
            other => OperatorError::Ca(other),
        })
}

/// Creates an operator from a CSR; returns the record and the certificate.
pub async fn create_operator(
    state: &ServerState,
    request: NewOperator,
    created_by: &str,
) -> Result<(OperatorRecord, String), OperatorError> {
    if !is_valid_segment(&request.name) {
        return Err(OperatorError::InvalidName(request.name));
    }
    let role = parse_role(&request.role)?;
    if state.store.operator(&request.name).await?.is_some() {
        return Err(OperatorError::AlreadyExists(request.name));
    }
    let identity = Identity::operator(&state.config.trust_domain, &request.name);
    let issued = issue_operator_certificate(state, &identity, &request.csr_pem)?;
    let record = OperatorRecord {
        name: request.name,
        role,
        created_at: state.clock.now_unix(),
        created_by: created_by.to_owned(),
        certificate_serial: issued.serial_hex,
        certificate_not_after: to_unix(issued.not_after),
        revoked_at: None,
    };
    state.store.insert_operator(&record).await?;
    tracing::info!(operator = %identity, %role, %created_by, "operator created");
    Ok((record, issued.certificate_pem))
}

/// Issues the active operator `name` (the caller itself: the edge takes it
/// from the caller's certificate) a new certificate from `csr_pem` and
/// records it; the certificate is returned only once recorded. The old
/// certificate stays valid until it expires, like a machine's previous one.
pub async fn renew_certificate(
    state: &ServerState,
    name: &str,
    csr_pem: &str,
) -> Result<(OperatorRecord, String), OperatorError> {
    active_operator(state, name).await?;
    let identity = Identity::operator(&state.config.trust_domain, name);
    let issued = issue_operator_certificate(state, &identity, csr_pem)?;
    // The store refuses a revoked operator in the same statement, so a
    // revocation between the check above and this write still wins.
    let record = state
        .store
        .record_operator_certificate(name, &issued.serial_hex, to_unix(issued.not_after))
        .await?
        .ok_or_else(|| OperatorError::NotFound(name.to_owned()))?;
    tracing::info!(operator = %identity, serial = %issued.serial_hex, "operator certificate renewed");
    Ok((record, issued.certificate_pem))
}

/// Changes an operator's role, never leaving the fleet without an admin.
pub async fn set_role(
    state: &ServerState,
    name: &str,
    role: &str,
) -> Result<OperatorRecord, OperatorError> {
    let role = parse_role(role)?;
    active_operator(state, name).await?;
    let change = state.store.set_operator_role(name, role).await?;
    let updated = changed_operator(change, name)?;
    Ok(updated)
}

/// Revokes the operator `name` (also used by user off-boarding).
pub async fn revoke(
    state: &ServerState,
    name: &str,
    revoked_by: &str,
) -> Result<OperatorRecord, OperatorError> {
    let operator = active_operator(state, name).await?;
    let now = state.clock.now_unix();
    let identity_uri = Identity::operator(&state.config.trust_domain, name).uri();
    let reason = format!("operator {name} was revoked by {revoked_by}");
    let denied = denial(
        &reason,
        now,
        [
            (DeniedKind::Identity, identity_uri.clone()),
            (DeniedKind::Serial, operator.certificate_serial.clone()),
        ],
    );
    let change = state.store.revoke_operator(name, now, &denied).await?;
    let revoked = changed_operator(change, name)?;
    state
        .revocations
        .enforce(&denied, &identity_uri, REVOCATION_GRACE);
    state
        .feed
        .announce(Change::Denied {
            identity_uri: identity_uri.clone(),
        })
        .await;
    tracing::warn!(operator = %identity_uri, %revoked_by, "operator revoked");
    Ok(revoked)
}
