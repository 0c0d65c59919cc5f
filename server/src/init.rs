//! `flotte-server init`: creates a data dir with the CA, the server settings
//! file, the store with its first operator (`admin`, role admin, and the
//! audit log's first entry saying so) and that operator's profile. Refuses to
//! touch an existing CA.
//!
//! `flotte-server replica init` prepares another replica's data dir from
//! the first one: the CA (the private key is copied file to file, never
//! through the database), the audit key (replicas sign one audit chain
//! with one key), the settings with this replica's own name,
//! listen address and zone, and the store's password file. Never the admin
//! profile, never a SQLite store: replicas share one PostgreSQL database.

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
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not parse: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "{0} keeps its state in SQLite: replicas share one PostgreSQL database (flotte-server init --store-url)"
    )]
    NotShared(PathBuf),
    #[error("{0} exists already: a replica is prepared into a new data dir")]
    Exists(PathBuf),
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
    /// The server's own name (its certificate says `server/<name>`).
    pub server_name: Option<String>,
    /// The zone it runs in (with several replicas).
    pub zone: Option<String>,
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
    if let Some(server_name) = options.server_name {
        settings.server_name = server_name;
    }
    settings.zone = options.zone.unwrap_or_default();
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

/// What makes one replica different from the others.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    pub name: String,
    pub listen: String,
    pub zone: Option<String>,
    /// `host:port` agents and operators reach it on, if not its listen address.
    pub advertise_address: Option<String>,
    /// The DNS names and IP addresses its certificate is valid for (besides
    /// localhost); none given: the host of the advertised (or listen)
    /// address, unless it is a wildcard.
    pub subject_alt_names: Vec<String>,
}

/// The names a replica's certificate needs: the ones asked for, or else
/// the host agents dial (the first replica's names are another host's).
fn replica_subject_alt_names(options: &ReplicaOptions) -> Vec<String> {
    if !options.subject_alt_names.is_empty() {
        return options.subject_alt_names.clone();
    }
    let dialled = options
        .advertise_address
        .as_deref()
        .unwrap_or(&options.listen);
    let host = dialled
        .rsplit_once(':')
        .map_or(dialled, |(host, _port)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let wildcard = host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|address| address.is_unspecified());
    if host.is_empty() || wildcard {
        Vec::new()
    } else {
        vec![host.to_owned()]
    }
}

/// Reads `path` whole, naming it if it cannot be read.
fn read_file(path: &Path) -> Result<Vec<u8>, InitError> {
    std::fs::read(path).map_err(|source| InitError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file only this user can read, naming it if it cannot be written.
fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), InitError> {
    files::write_private(path, contents).map_err(|source| InitError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Prepares `data_dir` for another replica of the server whose data dir is
/// `from` (see the module docs). Returns the new settings file's path.
pub fn init_replica(
    from: &Path,
    data_dir: &Path,
    options: ReplicaOptions,
) -> Result<PathBuf, InitError> {
    let from_config = default_config_path(from);
    let text = String::from_utf8_lossy(&read_file(&from_config)?).into_owned();
    let mut settings: ServerConfigFile =
        toml::from_str(&text).map_err(|error| InitError::Parse {
            path: from_config.clone(),
            message: error.message().to_owned(),
        })?;
    if settings.store.kind != crate::store::settings::StoreKind::Postgres {
        return Err(InitError::NotShared(from.to_owned()));
    }
    if data_dir.exists() {
        return Err(InitError::Exists(data_dir.to_owned()));
    }
    settings.subject_alt_names = replica_subject_alt_names(&options);
    settings.server_name = options.name;
    settings.listen = options.listen;
    settings.zone = options.zone.unwrap_or_default();
    settings.advertise_address = options.advertise_address;
    // Every problem of the new settings at once, before anything is written.
    settings.clone().validate(data_dir.to_owned())?;
    // Read everything before writing anything, so that a missing CA file
    // leaves no half-made data dir behind.
    let ca_certificate = read_file(&from.join("ca").join("ca.pem"))?;
    let ca_key = read_file(&from.join("ca").join("ca.key"))?;
    // A first data dir made before audit keys existed gets its key now (its
    // next start would make it anyway).
    crate::audit_key::AuditKey::load_or_create(from)?;
    let audit_key = read_file(&crate::audit_key::audit_key_path(from))?;
    // The store's files that live in the data dir (an absolute path is the
    // same file on every host: a mounted secret).
    let mut store_files = Vec::new();
    for relative in [&settings.store.password_file, &settings.store.tls_ca_file]
        .into_iter()
        .flatten()
        .filter(|path| path.is_relative())
    {
        store_files.push((relative.clone(), read_file(&from.join(relative))?));
    }
    let audit_key_path = crate::audit_key::audit_key_path(data_dir);
    let audit_dir = audit_key_path
        .parent()
        .map_or_else(|| data_dir.to_owned(), Path::to_path_buf);
    for directory in [data_dir.to_owned(), data_dir.join("ca"), audit_dir] {
        files::create_private_dir(&directory).map_err(|source| InitError::Io {
            path: directory.clone(),
            source,
        })?;
    }
    write_private_file(&data_dir.join("ca").join("ca.pem"), &ca_certificate)?;
    write_private_file(&data_dir.join("ca").join("ca.key"), &ca_key)?;
    write_private_file(&audit_key_path, &audit_key)?;
    for (relative, contents) in store_files {
        write_private_file(&data_dir.join(relative), &contents)?;
    }
    let config_path = default_config_path(data_dir);
    files::write_atomically(&config_path, toml::to_string(&settings)?.as_bytes()).map_err(
        |source| InitError::Io {
            path: config_path.clone(),
            source,
        },
    )?;
    Ok(config_path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::store::TemporaryDirectory;

    fn replica(name: &str) -> ReplicaOptions {
        ReplicaOptions {
            name: name.to_owned(),
            listen: "127.0.0.1:0".into(),
            zone: Some("z2".into()),
            advertise_address: None,
            subject_alt_names: Vec::new(),
        }
    }

    #[test]
    fn a_replica_certificate_names_the_host_agents_dial_not_the_first_replica() {
        let with = |listen: &str, advertise: Option<&str>, asked: &[&str]| {
            replica_subject_alt_names(&ReplicaOptions {
                name: "b".into(),
                listen: listen.into(),
                zone: None,
                advertise_address: advertise.map(str::to_owned),
                subject_alt_names: asked.iter().map(|name| (*name).to_owned()).collect(),
            })
        };
        // (listen, advertise, asked for, certificate names)
        type Case<'a> = (&'a str, Option<&'a str>, &'a [&'a str], &'a [&'a str]);
        let cases: [Case; 6] = [
            ("10.0.2.1:7443", None, &[], &["10.0.2.1"]),
            ("0.0.0.0:7443", None, &[], &[]),
            ("[::]:7443", None, &[], &[]),
            (
                "0.0.0.0:7443",
                Some("flotte-b.example.com:7443"),
                &[],
                &["flotte-b.example.com"],
            ),
            ("[fd00::2]:7443", None, &[], &["fd00::2"]),
            (
                "0.0.0.0:7443",
                Some("b:7443"),
                &["b.dc2", "10.0.2.1"],
                &["b.dc2", "10.0.2.1"],
            ),
        ];
        for (listen, advertise, asked, expected) in cases {
            assert_eq!(
                with(listen, advertise, asked),
                expected,
                "{listen} {advertise:?} {asked:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_replica_is_prepared_only_from_a_shared_store_with_its_own_settings() {
        let root = TemporaryDirectory::new();
        let first = root.0.join("first");
        init(&first, InitOptions::default()).await.unwrap();
        // SQLite is one server's own file: no replica of it.
        let refused = init_replica(&first, &root.0.join("b"), replica("b"));
        assert!(
            matches!(refused, Err(InitError::NotShared(_))),
            "{refused:?}"
        );
        assert!(!root.0.join("b").exists());

        // Made to look shared (no database is opened by `replica init`).
        let settings_path = default_config_path(&first);
        let settings = std::fs::read_to_string(&settings_path).unwrap();
        std::fs::write(
            &settings_path,
            format!(
                "{settings}\n[store]\nkind = \"postgres\"\nurl = \"postgres://flotte@db/flotte\"\n\
                 password_file = \"pg.pass\"\n"
            ),
        )
        .unwrap();
        files::write_private(&first.join("pg.pass"), b"secret\n").unwrap();
        let bad_name = init_replica(&first, &root.0.join("b"), replica("../b"));
        assert!(
            matches!(bad_name, Err(InitError::Config(_))),
            "{bad_name:?}"
        );
        assert!(
            !root.0.join("b").exists(),
            "nothing written for bad settings"
        );

        let config = init_replica(&first, &root.0.join("b"), replica("b")).unwrap();
        let written: ServerConfigFile =
            toml::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
        assert_eq!(written.server_name, "b");
        assert_eq!(written.zone, "z2");
        assert_eq!(written.listen, "127.0.0.1:0");
        let b = root.0.join("b");
        assert_eq!(std::fs::read(b.join("pg.pass")).unwrap(), b"secret\n");
        assert_eq!(
            std::fs::read(b.join("ca/ca.key")).unwrap(),
            std::fs::read(first.join("ca/ca.key")).unwrap()
        );
        assert_eq!(
            std::fs::read(crate::audit_key::audit_key_path(&b)).unwrap(),
            std::fs::read(crate::audit_key::audit_key_path(&first)).unwrap(),
            "one audit key for every replica"
        );
        assert!(!b.join("admin").exists(), "never the admin profile");
        assert!(!b.join("flotte.db").exists());
        let again = init_replica(&first, &b, replica("b"));
        assert!(matches!(again, Err(InitError::Exists(_))), "{again:?}");
    }
}
