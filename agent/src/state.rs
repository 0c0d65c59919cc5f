//! What the agent has applied from the server's desired state, and the seam
//! through which the session persists it (and renewed certificates).
//!
//! The real agent writes to its data dir; the load generator keeps simulated
//! agents in memory. Both go through [`Persistence`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flotte_proto::files;
use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, MachineIdentity};

/// The last desired state this agent applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    pub version: u64,
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    pub report_interval_seconds: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistenceError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// Where the session keeps what must survive a restart.
pub trait Persistence: Send + Sync {
    fn save_certificate(&self, identity: &MachineIdentity) -> Result<(), PersistenceError>;
    fn save_applied(&self, applied: &AppliedState) -> Result<(), PersistenceError>;
}

/// The agent's data dir.
#[derive(Debug, Clone)]
pub struct DiskPersistence {
    data_dir: PathBuf,
}

impl DiskPersistence {
    pub fn new(data_dir: &Path) -> Self {
        DiskPersistence {
            data_dir: data_dir.to_owned(),
        }
    }

    fn applied_path(&self) -> PathBuf {
        self.data_dir.join("applied-state.json")
    }

    /// The applied state from a previous run, or the default on first start.
    pub fn load_applied(&self) -> Result<AppliedState, PersistenceError> {
        let path = self.applied_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|error| PersistenceError::Corrupt {
                path,
                message: error.to_string(),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Ok(AppliedState::default())
            }
            Err(error) => Err(PersistenceError::Corrupt {
                path,
                message: error.to_string(),
            }),
        }
    }
}

impl Persistence for DiskPersistence {
    fn save_certificate(&self, identity: &MachineIdentity) -> Result<(), PersistenceError> {
        Ok(identity.save_certificate(&self.data_dir)?)
    }

    fn save_applied(&self, applied: &AppliedState) -> Result<(), PersistenceError> {
        let path = self.applied_path();
        let text =
            serde_json::to_vec_pretty(applied).map_err(|error| PersistenceError::Corrupt {
                path: path.clone(),
                message: error.to_string(),
            })?;
        files::write_atomically(&path, &text)
            .map_err(|source| PersistenceError::Io { path, source })
    }
}
