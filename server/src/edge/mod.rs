//! The gRPC edge: thin service implementations that check the caller, convert
//! proto ↔ domain types and call the domain. The only place where domain
//! errors become `tonic::Status`.

pub mod access;
pub mod auth;
pub mod enrollment;
pub mod guard;
pub mod images;
pub mod machines;
pub mod operators;
pub mod repair;
pub mod rollouts;
pub mod session;
pub mod tls;
pub mod tokens;
pub mod trust;

use tonic::Status;

use crate::edge::auth::AuthError;
use crate::services::enrollment::EnrollmentError;
use crate::store::StoreError;

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::NoCertificate | AuthError::Unusable(_) => {
                Status::unauthenticated(error.to_string())
            }
            AuthError::NotOperator(_)
            | AuthError::NotMachine(_)
            | AuthError::Revoked { .. }
            | AuthError::UnknownOperator(_)
            | AuthError::RoleTooLow { .. } => Status::permission_denied(error.to_string()),
            AuthError::NoConnectInfo => Status::internal(error.to_string()),
        }
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        if let StoreError::AlreadyExists(_) = error {
            return Status::already_exists(error.to_string());
        }
        tracing::error!(%error, "store failure");
        Status::internal(format!("store failure: {error}"))
    }
}

impl From<EnrollmentError> for Status {
    fn from(error: EnrollmentError) -> Self {
        match &error {
            EnrollmentError::MalformedToken(_) | EnrollmentError::BadCsr(_) => {
                Status::invalid_argument(error.to_string())
            }
            EnrollmentError::ForeignToken { .. }
            | EnrollmentError::Refused(_)
            | EnrollmentError::ReenrollRefused(_) => Status::permission_denied(error.to_string()),
            EnrollmentError::Ca(_) => Status::internal(error.to_string()),
            EnrollmentError::Store(_) => {
                tracing::error!(%error, "store failure during enrollment");
                Status::internal(error.to_string())
            }
        }
    }
}
