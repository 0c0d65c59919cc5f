//! Who is calling: the peer facts attached by `tls` turned into a caller
//! identity, and the checks each API applies (operator for admin calls,
//! machine for the agent session).
//!
//! Every check here is about the *kind* of identity; roles and the deny list
//! come on top of these in the API modules.

use flotte_proto::identity::{Identity, IdentityKind};
use uuid::Uuid;

use crate::tls::{PeerCertificate, PeerInfo};

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
}

/// A verified caller with the certificate it presented.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub serial_hex: String,
    pub not_after_unix: i64,
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
            not_after_unix,
        } => Ok(Caller {
            identity: identity.clone(),
            serial_hex: serial_hex.clone(),
            not_after_unix: *not_after_unix,
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
