//! The contract between Flotte processes: the `flotte.v1` protobuf messages and
//! gRPC services (generated at build time by protox, no system `protoc`), the
//! descriptor set for gRPC reflection, and the identity URI scheme carried in
//! every certificate.
//!
//! It also holds what every process must agree on to talk at all: the join
//! token format, the label/selector grammar, the hostname grammar (`names`), and how a client dials the server
//! (TCP + rustls + HTTP/2), with the codec every call's messages go through
//! (`codec`). Nothing here knows about storage or business rules:
//! the agent and the server convert these wire types into their own domain
//! types at their edges.

#[cfg(test)]
mod api_compatibility;
pub mod checks;
pub mod cli_help;
pub mod codec;
pub mod data_dir_lock;
pub mod files;
pub mod http;
pub mod identity;
pub mod image;
pub mod join_token;
pub mod labels;
pub mod logging;
pub mod names;
pub mod release_keys;
pub mod settings;
pub mod signals;
pub mod ssh_keys;
pub mod transport;

/// Generated code for the `flotte.v1` package.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("flotte.v1");
}

/// Encoded `FileDescriptorSet` of every `flotte.v1` file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flotte_descriptor");
