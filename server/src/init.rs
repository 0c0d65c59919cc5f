//! `flotte-server init`: creates a data dir with the CA, the server settings
//! file, the store with its first operator (`admin`, role admin, and the
//! audit log's first entry saying so) and that operator's profile. Refuses to
//! touch an existing CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotte_proto::files;
use flotte_proto::identity::Identity;

use crate::ca::{CaError, CertificateAuthority};
use crate::clock::{to_unix, Clock, SystemClock};
use crate::config::{default_config_path, ConfigError, ServerConfigFile};
use crate::metrics::StoreMetrics;
use crate::store::settings::{open_store, StoreConfigFile};
use crate::store::{OperatorRecord, StoreError};
use flotte_common::audit::AuditEvent;
use flotte_common::profile::{Profile, ProfileError, ProfileSettings};
use flotte_common::roles::{AdminRpc, Role};

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
    #[error("cannot create the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    AuditKey(#[from] crate::audit_key::AuditKeyError),
}

/// The actor recorded for what `init` does.
pub const INIT_ACTOR: &str = "flotte-server init";
/// The first operator's name.
pub const FIRST_ADMIN: &str = "admin";

#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    pub listen: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub trust_domain: Option<String>,
    /// The `[store]` table to write; the first admin is recorded there.
    pub store: StoreConfigFile,
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

/// Creates the data dir. Async only because the store is; run it on any runtime.
pub async fn init(data_dir: &Path, options: InitOptions) -> Result<InitSummary, InitError> {
    let mut settings = ServerConfigFile::default();
    if let Some(listen) = options.listen {
        settings.listen = listen;
    }
    if let Some(trust_domain) = options.trust_domain {
        settings.trust_domain = trust_domain;
    }
    settings.subject_alt_names = options.subject_alt_names;
    settings.store = options.store;
    let config = settings.clone().validate(data_dir.to_owned())?;

    files::create_private_dir(data_dir).map_err(|source| InitError::Io {
        path: data_dir.to_owned(),
        source,
    })?;
    let ca = CertificateAuthority::create(data_dir, &config.trust_domain)?;
    crate::audit_key::AuditKey::load_or_create(data_dir)?;
    let config_path = default_config_path(data_dir);
    files::write_atomically(&config_path, toml::to_string(&settings)?.as_bytes()).map_err(
        |source| InitError::Io {
            path: config_path.clone(),
            source,
        },
    )?;

    let admin = Identity::operator(&config.trust_domain, FIRST_ADMIN);
    let (certificate, key) = ca.issue_client_with_new_key(&admin, ADMIN_CERTIFICATE_LIFETIME)?;
    // The store knows the first admin from the start: the server refuses
    // operator identities it does not know, whatever their certificate says.
    let store = open_store(&config.store, data_dir, StoreMetrics::default())
        .await?
        .store;
    let now = SystemClock.now_unix();
    store
        .insert_operator(&OperatorRecord {
            name: FIRST_ADMIN.to_owned(),
            role: Role::Admin,
            created_at: now,
            created_by: INIT_ACTOR.to_owned(),
            certificate_serial: certificate.serial_hex.clone(),
            certificate_not_after: to_unix(certificate.not_after),
            revoked_at: None,
        })
        .await?;
    store
        .append_audit(&AuditEvent {
            at: now,
            actor: INIT_ACTOR.to_owned(),
            role: Role::Admin.to_string(),
            action: AdminRpc::CreateOperator.policy().action.to_owned(),
            arguments_json: serde_json::json!({ "name": FIRST_ADMIN, "role": Role::Admin.as_str() })
                .to_string(),
            result: format!("ok: certificate serial {}", certificate.serial_hex),
        })
        .await?;
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
