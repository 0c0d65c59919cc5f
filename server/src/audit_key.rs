//! The audit key: the ed25519 key the server signs audit checkpoints with,
//! and the `[audit]` settings of how often it does.
//!
//! The key lives in the data directory (`audit/audit-key.pk8`, 0600 in a
//! 0700 directory), never in the database: whoever can write the database
//! (a stolen backup of it, a PostgreSQL administrator) can then rewrite the
//! chain but cannot sign a checkpoint over the rewritten one. It is created
//! by `init`, or at the first start of a data dir made before it existed,
//! and travels with backups (a restored server keeps signing with it, so
//! operators' remembered heads stay checkable).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotte_proto::settings::parse_duration_field;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

const AUDIT_DIR: &str = "audit";
const AUDIT_KEY_FILE: &str = "audit-key.pk8";
/// A PKCS#8 ed25519 document is under 100 bytes.
const MAX_KEY_FILE_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not an ed25519 PKCS#8 key")]
    NotAKey(PathBuf),
    #[error("cannot generate the audit key")]
    Generate,
}

/// The server's audit signing key.
pub struct AuditKey {
    pub key_pair: Ed25519KeyPair,
    /// Hex of the raw public key, as readers pin it.
    pub public_key_hex: String,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("public_key_hex", &self.public_key_hex)
            .finish_non_exhaustive()
    }
}

pub fn audit_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(AUDIT_DIR).join(AUDIT_KEY_FILE)
}

impl AuditKey {
    /// Loads the data dir's audit key, creating it (exclusively) if absent.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, AuditKeyError> {
        let path = audit_key_path(data_dir);
        let io_error = |source| AuditKeyError::Io {
            path: path.clone(),
            source,
        };
        if !path.exists() {
            let directory = data_dir.join(AUDIT_DIR);
            flotte_proto::files::create_private_dir(&directory).map_err(|source| {
                AuditKeyError::Io {
                    path: directory.clone(),
                    source,
                }
            })?;
            let document = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .map_err(|_| AuditKeyError::Generate)?;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(document.as_ref()).map_err(io_error)?;
                    file.sync_all().map_err(io_error)?;
                }
                // Another process made it meanwhile: use theirs.
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(io_error(error)),
            }
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(
                std::fs::File::open(&path).map_err(io_error)?,
                MAX_KEY_FILE_BYTES,
            ),
            &mut bytes,
        )
        .map_err(io_error)?;
        let key_pair =
            Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| AuditKeyError::NotAKey(path.clone()))?;
        let public_key_hex = hex::encode(key_pair.public_key().as_ref());
        Ok(AuditKey {
            key_pair,
            public_key_hex,
        })
    }
}

/// The `[audit]` table of `server.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfigFile {
    /// Sign the head once this many entries follow the last checkpoint.
    pub checkpoint_every_entries: u64,
    /// Sign the head at least this often while entries are added.
    pub checkpoint_interval: String,
}

impl Default for AuditConfigFile {
    fn default() -> Self {
        AuditConfigFile {
            checkpoint_every_entries: 100,
            checkpoint_interval: "5m".into(),
        }
    }
}

/// Validated `[audit]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    pub checkpoint_every_entries: u64,
    pub checkpoint_interval: Duration,
}

impl AuditConfigFile {
    pub fn is_default(&self) -> bool {
        *self == AuditConfigFile::default()
    }

    /// Adds every problem to `problems`.
    pub fn validate(&self, problems: &mut Vec<String>) -> AuditSettings {
        if self.checkpoint_every_entries == 0 {
            problems.push("audit.checkpoint_every_entries must be at least 1".to_owned());
        }
        let checkpoint_interval = parse_duration_field(
            "audit.checkpoint_interval",
            &self.checkpoint_interval,
            Duration::from_secs(1),
            problems,
        );
        AuditSettings {
            checkpoint_every_entries: self.checkpoint_every_entries.max(1),
            checkpoint_interval,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_key_is_made_once_private_and_loaded_again() {
        let dir = std::env::temp_dir().join(format!("flotte-audit-key-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = AuditKey::load_or_create(&dir).unwrap();
        let loaded = AuditKey::load_or_create(&dir).unwrap();
        assert_eq!(made.public_key_hex, loaded.public_key_hex);
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&audit_key_path(&dir)), 0o600);
        assert_eq!(mode(&dir.join(AUDIT_DIR)), 0o700);
        std::fs::write(audit_key_path(&dir), b"garbage").unwrap();
        assert!(matches!(
            AuditKey::load_or_create(&dir),
            Err(AuditKeyError::NotAKey(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn settings_report_every_problem() {
        let mut problems = Vec::new();
        let settings = AuditConfigFile::default().validate(&mut problems);
        assert!(problems.is_empty());
        assert_eq!(settings.checkpoint_interval, Duration::from_secs(300));
        let mut problems = Vec::new();
        AuditConfigFile {
            checkpoint_every_entries: 0,
            checkpoint_interval: "often".into(),
        }
        .validate(&mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
