//! Who is calling: the peer facts attached by `tls` turned into a caller
//! identity, and the checks each API applies (operator for admin calls,
//! machine for the agent session): the kind of identity, the deny list (a
//! TLS connection outlives a revocation by up to the moment it is cut, so
//! every RPC checks again), and the operator's role against the policy table
//! in `roles`.
//!
//! Decisions only: no store access and no tonic statuses (the API turns
//! these errors into statuses).

use flotte_proto::identity::{Identity, IdentityKind};
use uuid::Uuid;

use crate::edge::tls::{PeerCertificate, PeerInfo};
use crate::live::revocation::Revocations;
use crate::store::OperatorRecord;
use flotte_common::roles::{may_call, required_role, AdminRpc, Role};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("this call needs a client certificate issued by the Flotte CA; none was presented")]
    NoCertificate,
    #[error("the client certificate cannot be used: {0}")]
    Unusable(String),
    #[error("identity {0} is not an operator: admin calls need an operator certificate")]
    NotOperator(Identity),
    #[error("identity {0} is not a machine: the agent session needs a machine certificate")]
    NotMachine(Identity),
    #[error("connection information is missing (internal error)")]
    NoConnectInfo,
    #[error("identity {identity} is refused: {reason}")]
    Revoked { identity: Identity, reason: String },
    #[error(
        "operator {0} is not known to this server (ask an admin for `flottectl operator create`)"
    )]
    UnknownOperator(String),
    #[error("{method} needs role {needed}; operator {operator} has role {has}")]
    RoleTooLow {
        method: &'static str,
        needed: Role,
        operator: String,
        has: Role,
    },
}

/// A verified caller with the certificate it presented.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub serial_hex: String,
    pub peer: PeerInfo,
}

pub fn peer_info<T>(request: &tonic::Request<T>) -> Result<&PeerInfo, AuthError> {
    request
        .extensions()
        .get::<PeerInfo>()
        .ok_or(AuthError::NoConnectInfo)
}

pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, AuthError> {
    let peer = peer_info(request)?;
    match &peer.certificate {
        PeerCertificate::Anonymous => Err(AuthError::NoCertificate),
        PeerCertificate::Unusable(reason) => Err(AuthError::Unusable(reason.clone())),
        PeerCertificate::Verified {
            identity,
            serial_hex,
            ..
        } => Ok(Caller {
            identity: identity.clone(),
            serial_hex: serial_hex.clone(),
            peer: peer.clone(),
        }),
    }
}

pub fn require_operator<T>(request: &tonic::Request<T>) -> Result<Caller, AuthError> {
    let caller = caller(request)?;
    if caller.identity.kind != IdentityKind::Operator {
        return Err(AuthError::NotOperator(caller.identity));
    }
    Ok(caller)
}

/// A machine caller and its id (the UUID in its identity URI).
pub fn require_machine<T>(request: &tonic::Request<T>) -> Result<(Uuid, Caller), AuthError> {
    let caller = caller(request)?;
    if caller.identity.kind != IdentityKind::Machine {
        return Err(AuthError::NotMachine(caller.identity));
    }
    // `Identity` parsing already guarantees a machine name is a UUID.
    let id = Uuid::parse_str(&caller.identity.name)
        .map_err(|error| AuthError::Unusable(error.to_string()))?;
    Ok((id, caller))
}

/// Any verified identity (used for read-only introspection such as reflection).
pub fn require_any_identity<T>(request: &tonic::Request<T>) -> Result<Caller, AuthError> {
    caller(request)
}

/// Refuses a caller whose identity or certificate is on the deny list.
pub fn require_not_revoked(caller: &Caller, revocations: &Revocations) -> Result<(), AuthError> {
    match revocations.refusal(&caller.identity.uri(), &caller.serial_hex) {
        Some(reason) => Err(AuthError::Revoked {
            identity: caller.identity.clone(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The role with which `operator` (as stored, if at all) may call `rpc`.
/// A revoked operator is refused even if its identity has not reached the
/// in-memory deny list.
pub fn authorize_operator(
    caller: &Caller,
    operator: Option<&OperatorRecord>,
    rpc: AdminRpc,
) -> Result<Role, AuthError> {
    let operator =
        operator.ok_or_else(|| AuthError::UnknownOperator(caller.identity.name.clone()))?;
    if operator.revoked_at.is_some() {
        return Err(AuthError::Revoked {
            identity: caller.identity.clone(),
            reason: format!("operator {} was revoked", operator.name),
        });
    }
    if !may_call(operator.role, rpc) {
        return Err(AuthError::RoleTooLow {
            method: rpc.policy().method_path,
            needed: required_role(rpc),
            operator: operator.name.clone(),
            has: operator.role,
        });
    }
    Ok(operator.role)
}
