//! Every way a flottectl command fails, and the exit code of each: 2 for a
//! usage mistake (nothing was sent), 1 for everything else. Handlers return
//! these; only `main` turns them into a message and an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("no profile: pass --profile DIR|NAME, set FLOTTE_PROFILE, or add a named one with `flottectl profile import DIR --name NAME`")]
    NoProfile,
    #[error(transparent)]
    Profile(#[from] flotte_common::profile::ProfileError),
    #[error(transparent)]
    Transport(#[from] flotte_proto::transport::TransportError),
    #[error("{0}")]
    Usage(String),
    /// A failed RPC, already explained (see `transport::explain_status_with`).
    #[error("{0}")]
    Rpc(String),
    #[error("cannot encode output: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot encode output as YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate the operator's key: {0}")]
    Key(#[from] flotte_common::key_request::KeyRequestError),
    /// A local I/O failure, naming what was being done.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The audit log failed verification (already explained).
    #[error("{0}")]
    AuditBroken(String),
    /// Image verification found drift, or machines did not answer.
    #[error("{0}")]
    Integrity(String),
    /// Ctrl-C stopped the command (what goes on without it is said).
    #[error("{0}")]
    Interrupted(String),
}

impl CtlError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CtlError::Usage(_) | CtlError::NoProfile => ExitCode::from(2),
            // 128 + SIGINT, as shells report a command Ctrl-C stopped.
            CtlError::Interrupted(_) => ExitCode::from(130),
            _ => ExitCode::FAILURE,
        }
    }
}
