//! Operator profiles: a directory holding what `flottectl` needs to reach the
//! server as one operator — the CA certificate to trust, the operator's client
//! certificate and key (0600), and the server address.

use std::path::{Path, PathBuf};

use flotte_proto::files;
use serde::{Deserialize, Serialize};

pub const PROFILE_FILE: &str = "profile.toml";
pub const CA_FILE: &str = "ca.pem";
pub const CERTIFICATE_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProfileSettings {
    /// `host:port` of the server's gRPC listener.
    pub server: String,
    /// The operator identity URI, for display.
    pub identity: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write profile file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("profile file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
}

/// A loaded profile: PEM texts and settings.
#[derive(Clone)]
pub struct Profile {
    pub settings: ProfileSettings,
    pub ca_pem: String,
    pub certificate_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn read(path: PathBuf) -> Result<String, ProfileError> {
    std::fs::read_to_string(&path).map_err(|source| ProfileError::Read { path, source })
}

impl Profile {
    pub fn load(dir: &Path) -> Result<Self, ProfileError> {
        let settings_path = dir.join(PROFILE_FILE);
        let settings_text = read(settings_path.clone())?;
        let settings = toml::from_str(&settings_text).map_err(|error| ProfileError::Parse {
            path: settings_path,
            message: error.to_string(),
        })?;
        Ok(Profile {
            settings,
            ca_pem: read(dir.join(CA_FILE))?,
            certificate_pem: read(dir.join(CERTIFICATE_FILE))?,
            key_pem: read(dir.join(KEY_FILE))?,
        })
    }

    pub fn write(&self, dir: &Path) -> Result<(), ProfileError> {
        self.write_files(dir, true)
    }

    /// Writes everything but the private key (for an operator whose key was
    /// made on their own machine: they add `key.pem` themselves).
    pub fn write_without_key(&self, dir: &Path) -> Result<(), ProfileError> {
        self.write_files(dir, false)
    }

    fn write_files(&self, dir: &Path, with_key: bool) -> Result<(), ProfileError> {
        let write_error = |path: &Path| {
            let path = path.to_owned();
            move |source| ProfileError::Write { path, source }
        };
        files::create_private_dir(dir).map_err(write_error(dir))?;
        let settings = toml::to_string(&self.settings).map_err(|error| ProfileError::Parse {
            path: dir.join(PROFILE_FILE),
            message: error.to_string(),
        })?;
        for (name, contents, private) in [
            (PROFILE_FILE, settings.as_str(), false),
            (CA_FILE, self.ca_pem.as_str(), false),
            (CERTIFICATE_FILE, self.certificate_pem.as_str(), false),
            (KEY_FILE, self.key_pem.as_str(), true),
        ] {
            if name == KEY_FILE && !with_key {
                continue;
            }
            let path = dir.join(name);
            let result = if private {
                files::write_private(&path, contents.as_bytes())
            } else {
                files::write_atomically(&path, contents.as_bytes())
            };
            result.map_err(write_error(&path))?;
        }
        Ok(())
    }
}
