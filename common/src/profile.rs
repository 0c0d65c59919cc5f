//! Operator profiles: a directory holding what `flottectl` needs to reach the
//! server as one operator — the CA certificate to trust, the operator's client
//! certificate and key (0600), and the server address. A profile also knows
//! when its certificate is due for renewal (a third of its lifetime left)
//! and replaces its certificate atomically when renewed.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    #[error("the profile's certificate cannot be read: {0}")]
    Certificate(String),
}

/// When a profile's certificate is valid (from the certificate itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertificateValidity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertificateValidity {
    /// Renewal is due once less than a third of the lifetime is left, like
    /// a machine's (an expired certificate cannot renew over mutual TLS).
    pub fn renewal_due(&self, now: SystemTime) -> bool {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.remaining(now) < lifetime / 3
    }

    /// What is left of the lifetime at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or(Duration::ZERO)
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.not_after <= now
    }
}

/// The validity period of a PEM certificate.
pub fn certificate_validity(certificate_pem: &str) -> Result<CertificateValidity, ProfileError> {
    let bad = |reason: String| ProfileError::Certificate(reason);
    let (_, pem) = x509_parser::pem::parse_x509_pem(certificate_pem.as_bytes())
        .map_err(|error| bad(error.to_string()))?;
    let certificate = pem.parse_x509().map_err(|error| bad(error.to_string()))?;
    let validity = certificate.validity();
    let at = |time: &x509_parser::time::ASN1Time| {
        let seconds = u64::try_from(time.timestamp())
            .map_err(|_| bad(format!("a validity time before 1970: {time}")))?;
        Ok(UNIX_EPOCH + Duration::from_secs(seconds))
    };
    Ok(CertificateValidity {
        not_before: at(&validity.not_before)?,
        not_after: at(&validity.not_after)?,
    })
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

    /// The validity period of this profile's certificate.
    pub fn certificate_validity(&self) -> Result<CertificateValidity, ProfileError> {
        certificate_validity(&self.certificate_pem)
    }

    /// Replaces the certificate (and the CA certificate the server sent with
    /// it) of the profile in `dir`, keeping its key: each file is replaced
    /// atomically, the certificate last, so that a crash leaves the old
    /// certificate or the new one, never a torn file.
    pub fn replace_certificate(
        &mut self,
        dir: &Path,
        certificate_pem: String,
        ca_pem: String,
    ) -> Result<(), ProfileError> {
        for (name, contents) in [(CA_FILE, &ca_pem), (CERTIFICATE_FILE, &certificate_pem)] {
            let path = dir.join(name);
            files::write_atomically(&path, contents.as_bytes())
                .map_err(|source| ProfileError::Write { path, source })?;
        }
        self.certificate_pem = certificate_pem;
        self.ca_pem = ca_pem;
        Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn validity(not_before: u64, not_after: u64) -> CertificateValidity {
        CertificateValidity {
            not_before: UNIX_EPOCH + Duration::from_secs(not_before),
            not_after: UNIX_EPOCH + Duration::from_secs(not_after),
        }
    }

    #[test]
    fn renewal_is_due_once_less_than_a_third_of_the_lifetime_is_left() {
        let certificate = validity(1_000, 1_900);
        let at = |seconds: u64| UNIX_EPOCH + Duration::from_secs(seconds);
        assert!(!certificate.renewal_due(at(1_000)));
        assert!(!certificate.renewal_due(at(1_600)), "exactly a third left");
        assert!(certificate.renewal_due(at(1_601)));
        assert!(certificate.renewal_due(at(5_000)), "expired");
        assert!(certificate.is_expired(at(1_900)));
        assert_eq!(certificate.remaining(at(1_800)), Duration::from_secs(100));
    }

    #[test]
    fn a_certificate_s_validity_is_read_from_it_and_garbage_is_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 4, 1);
        let pem = params.self_signed(&key).unwrap().pem();
        let read = certificate_validity(&pem).unwrap();
        assert_eq!(
            read.not_after.duration_since(read.not_before).unwrap(),
            Duration::from_secs(90 * 24 * 3600)
        );
        assert!(matches!(
            certificate_validity("not a certificate"),
            Err(ProfileError::Certificate(_))
        ));
    }
}
