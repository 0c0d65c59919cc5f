//! `flotte-server init`: creates a data dir with the CA, the server settings
//! file and the first admin operator profile. Refuses to touch an existing CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotte_proto::files;
use flotte_proto::identity::Identity;

use crate::ca::{CaError, CertificateAuthority};
use crate::config::{default_config_path, ConfigError, ServerConfigFile};
use crate::profile::{Profile, ProfileError, ProfileSettings};

/// The first admin's profile is meant to bootstrap; it lasts a year.
const ADMIN_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode settings: {0}")]
    Encode(#[from] toml::ser::Error),
}

#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    pub listen: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub trust_domain: Option<String>,
}

#[derive(Debug, Clone)]
pub struct InitSummary {
    pub config_path: PathBuf,
    pub admin_profile: PathBuf,
    pub ca_fingerprint: String,
}

/// The address clients should dial for a listen address: an unspecified IP
/// (0.0.0.0 / ::) is reached through loopback on the same host.
pub fn dial_address(listen: SocketAddr) -> String {
    let ip = if listen.ip().is_unspecified() {
        match listen {
            SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
            SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        listen.ip()
    };
    SocketAddr::new(ip, listen.port()).to_string()
}

pub fn init(data_dir: &Path, options: InitOptions) -> Result<InitSummary, InitError> {
    let mut settings = ServerConfigFile::default();
    if let Some(listen) = options.listen {
        settings.listen = listen;
    }
    if let Some(trust_domain) = options.trust_domain {
        settings.trust_domain = trust_domain;
    }
    settings.subject_alt_names = options.subject_alt_names;
    let config = settings.clone().validate(data_dir.to_owned())?;

    files::create_private_dir(data_dir).map_err(|source| InitError::Io {
        path: data_dir.to_owned(),
        source,
    })?;
    let ca = CertificateAuthority::create(data_dir, &config.trust_domain)?;
    let config_path = default_config_path(data_dir);
    files::write_atomically(&config_path, toml::to_string(&settings)?.as_bytes()).map_err(
        |source| InitError::Io {
            path: config_path.clone(),
            source,
        },
    )?;

    let admin = Identity::operator(&config.trust_domain, "admin");
    let (certificate, key) = ca.issue_client_with_new_key(&admin, ADMIN_CERTIFICATE_LIFETIME)?;
    let admin_profile = data_dir.join("admin");
    Profile {
        settings: ProfileSettings {
            server: dial_address(config.listen),
            identity: admin.uri(),
        },
        ca_pem: ca.certificate_pem().to_owned(),
        certificate_pem: certificate.certificate_pem,
        key_pem: key.serialize_pem(),
    }
    .write(&admin_profile)?;
    Ok(InitSummary {
        config_path,
        admin_profile,
        ca_fingerprint: ca.fingerprint(),
    })
}
