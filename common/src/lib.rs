//! flotte-common: what both sides of the admin API need, the server and
//! `flottectl` alike — operator profiles (`profile`), the role table of every
//! admin RPC (`roles`), the audit log's hash chain and its verification
//! (`audit`) against signed checkpoints (`audit_checkpoints`), packing and reading signed `.flotte` image files
//! (`image_build`), and the key and certificate request of a new operator
//! identity (`key_request`).
//!
//! It exists so that the CLI never links the server (and its SQLite): what
//! lives here must be needed by both. It never does network or database I/O
//! and never sees tonic; the only files it touches are the ones a caller
//! names (a profile directory, an image file or tree).

pub mod audit;
pub mod audit_checkpoints;
pub mod image_build;
pub mod key_request;
pub mod profile;
pub mod roles;
