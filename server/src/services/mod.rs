//! The services layer: one service per aggregate, holding the rules of the
//! product — enrollment and renewal, join tokens, machines, operators, users
//! and grants, quarantine and forensics, images. Each has its own typed error;
//! a rule that must hold under concurrency is one conditional store operation.
//!
//! What must never live here: tonic or generated proto types (the edge
//! converts both ways and maps errors to statuses), and no service calls up
//! into the edge.

pub mod access;
pub mod audit;
pub mod enrollment;
pub mod forensics;
pub mod images;
pub mod integrity;
pub mod machines;
pub mod operators;
pub mod quarantine;
pub mod renewal;
pub mod tokens;
