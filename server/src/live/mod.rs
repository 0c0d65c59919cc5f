//! The live layer: what one server process holds in memory and the loops it
//! runs — the registry of agent sessions, the desired-state publisher, the
//! deny list with the connections it closes, the health tracker and its
//! transitions, the access hub, the rollout engine (`rollout`: create,
//! operator commands, controller passes) and the remediation loop; and, for
//! several replicas on one database, this replica's lease and sessions
//! (`replicas`), the leader-only loops' lease (`leadership`) and the change
//! feed that carries every change to the other replicas (`feed`).
//!
//! What must never live here: a tonic or generated proto type (the edge
//! converts), or a decision (those are pure functions in `domain`; the loops
//! here read state, call the decision and apply its actions).

pub mod access_hub;
pub mod audit_checkpoints;
pub mod feed;
pub mod health;
pub mod image_ages;
pub mod leadership;
pub mod providers;
pub mod publisher;
pub mod registry;
pub mod remediation;
pub mod repair_state;
pub mod replicas;
pub mod revocation;
pub mod rollout;
pub mod transitions;
