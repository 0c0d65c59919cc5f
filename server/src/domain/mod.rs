//! The domain layer: pure decisions over domain types — rollout plans, waves
//! and the rollout controller, remediation and its breaker, zone-loss impact,
//! the access policy compile, and request validation rules.
//!
//! What must never live here: I/O of any kind (no store, no clock read, no
//! network, no spawned task), and no tonic or generated proto type. Every
//! function here is a function of its arguments, which is why the controllers
//! are tested with tables of cases.

pub mod access;
pub mod access_policy;
pub mod audit;
pub mod desired_state;
pub mod health;
pub mod image_age;
pub mod repair;
pub mod rollout;
