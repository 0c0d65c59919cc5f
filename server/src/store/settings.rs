//! Which backend the server keeps its state in: the `[store]` table of
//! `server.toml` as written (`kind = "sqlite"`, the embedded default, or
//! `kind = "postgres"` with a `url` and an optional `password_file`), its
//! validation (every problem reported together, like the rest of the
//! settings), and opening the chosen backend behind the store traits.
//!
//! The password never sits in the URL (which is shown in logs and errors):
//! a URL carrying one is refused, and the file is read only when the store
//! is opened.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::integrity::IntegrityStore;
use super::postgres::{postgres_url_problems, PostgresStore};
use super::repair::RepairStore;
use super::replicas::ReplicaStore;
use super::{AccessStore, RolloutStore, SqliteStore, Store, StoreError};
use crate::forensics::{DirectoryForensicStore, ForensicStore};
use crate::images::{BlobStore, DirectoryBlobStore};
use crate::metrics::StoreMetrics;

/// Bound on a password file: a password is short, and a wrong path (a log,
/// a disk image) must not be read whole.
const PASSWORD_FILE_MAX_BYTES: u64 = 4096;

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Sqlite,
    Postgres,
}

/// The `[store]` table as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfigFile {
    pub kind: StoreKind,
    /// `postgres://user@host:port/database`, without a password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the PostgreSQL password (relative to the data dir).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Connect over TLS (required, TLS 1.3, rustls), trusting only the CA
    /// certificates in this PEM file (relative to the data dir); the
    /// server's certificate must name the URL's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
}

/// The validated choice of backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSettings {
    /// `flotte.db` in the data dir.
    Sqlite,
    Postgres {
        url: String,
        password_file: Option<PathBuf>,
        tls_ca_file: Option<PathBuf>,
    },
}

impl StoreConfigFile {
    pub fn is_default(&self) -> bool {
        *self == StoreConfigFile::default()
    }

    /// Adds every problem to `problems`; the settings if there was none here.
    pub fn validate(&self, data_dir: &Path, problems: &mut Vec<String>) -> StoreSettings {
        match self.kind {
            StoreKind::Sqlite => {
                if self.url.is_some() || self.password_file.is_some() || self.tls_ca_file.is_some()
                {
                    problems.push(
                        "store: url, password_file and tls_ca_file apply only to kind = \"postgres\""
                            .into(),
                    );
                }
                StoreSettings::Sqlite
            }
            StoreKind::Postgres => {
                let url = match &self.url {
                    Some(url) => {
                        problems.extend(postgres_url_problems(url));
                        url.clone()
                    }
                    None => {
                        problems.push(
                            "store: kind = \"postgres\" needs url = \"postgres://user@host:port/database\""
                                .into(),
                        );
                        String::new()
                    }
                };
                StoreSettings::Postgres {
                    url,
                    password_file: self.password_file.as_ref().map(|file| data_dir.join(file)),
                    tls_ca_file: self.tls_ca_file.as_ref().map(|file| data_dir.join(file)),
                }
            }
        }
    }
}

/// One opened backend, as each part of the server sees it.
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    pub access: Arc<dyn AccessStore>,
    pub rollouts: Arc<dyn RolloutStore>,
    pub repair: Arc<dyn RepairStore>,
    pub replicas: Arc<dyn ReplicaStore>,
    pub integrity: Arc<dyn IntegrityStore>,
    /// Image payloads: files in the data dir with SQLite, rows with
    /// PostgreSQL (every replica serves every download).
    pub blobs: Arc<dyn BlobStore>,
    /// Forensic bundles: files in the data dir with SQLite, rows with
    /// PostgreSQL (every replica serves every bundle).
    pub forensics: Arc<dyn ForensicStore>,
}

impl OpenedStore {
    fn new<Backend>(
        backend: Backend,
        blobs: Arc<dyn BlobStore>,
        forensics: Arc<dyn ForensicStore>,
    ) -> Self
    where
        Backend: Store
            + AccessStore
            + RolloutStore
            + RepairStore
            + ReplicaStore
            + IntegrityStore
            + Clone,
    {
        OpenedStore {
            blobs,
            forensics,
            store: Arc::new(backend.clone()),
            access: Arc::new(backend.clone()),
            rollouts: Arc::new(backend.clone()),
            repair: Arc::new(backend.clone()),
            replicas: Arc::new(backend.clone()),
            integrity: Arc::new(backend),
        }
    }
}

/// The password in `path`, without its trailing newline.
pub(crate) fn read_password(path: &Path) -> Result<String, StoreError> {
    let unreadable = |error: std::io::Error| {
        StoreError::Backend(format!(
            "cannot read the PostgreSQL password file {}: {error}",
            path.display()
        ))
    };
    let size = std::fs::metadata(path).map_err(unreadable)?.len();
    if size > PASSWORD_FILE_MAX_BYTES {
        return Err(StoreError::Backend(format!(
            "the PostgreSQL password file {} is {size} bytes, more than the {PASSWORD_FILE_MAX_BYTES} a password may take",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// Bound on a CA file: a few certificates, not a log read by mistake.
const TLS_CA_FILE_MAX_BYTES: u64 = 1024 * 1024;

/// The TLS settings for PostgreSQL: TLS 1.3 (ring), trusting only the CA
/// certificates of `ca_file`.
pub(crate) fn postgres_tls(ca_file: &Path) -> Result<rustls::ClientConfig, StoreError> {
    let unreadable = |reason: String| {
        StoreError::Backend(format!(
            "PostgreSQL TLS CA file {}: {reason}",
            ca_file.display()
        ))
    };
    let size = std::fs::metadata(ca_file)
        .map_err(|error| unreadable(error.to_string()))?
        .len();
    if size > TLS_CA_FILE_MAX_BYTES {
        return Err(unreadable(format!(
            "{size} bytes, more than the {TLS_CA_FILE_MAX_BYTES} a CA file may take"
        )));
    }
    let pem = std::fs::read_to_string(ca_file).map_err(|error| unreadable(error.to_string()))?;
    let mut config = flotte_proto::transport::client_config(&pem, None)
        .map_err(|error| unreadable(error.to_string()))?;
    // PostgreSQL negotiates no application protocol over TLS.
    config.alpn_protocols.clear();
    Ok(config)
}

/// Opens the chosen backend (`data_dir` holds the SQLite file), bringing
/// its schema to the latest version.
pub async fn open_store(
    settings: &StoreSettings,
    data_dir: &Path,
    metrics: StoreMetrics,
) -> Result<OpenedStore, StoreError> {
    match settings {
        StoreSettings::Sqlite => Ok(OpenedStore::new(
            SqliteStore::open_with_metrics(&crate::store_path(data_dir), metrics)?,
            Arc::new(DirectoryBlobStore::new(data_dir)),
            Arc::new(DirectoryForensicStore::new(data_dir)),
        )),
        StoreSettings::Postgres {
            url,
            password_file,
            tls_ca_file,
        } => {
            let password = password_file.as_deref().map(read_password).transpose()?;
            let tls = tls_ca_file.as_deref().map(postgres_tls).transpose()?;
            let store = PostgresStore::connect(url, password, tls)
                .await?
                .with_metrics(metrics);
            Ok(OpenedStore::new(
                store.clone(),
                Arc::new(store.clone()),
                Arc::new(store),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str) -> (StoreSettings, Vec<String>) {
        let file: StoreConfigFile = toml::from_str(text).expect("parses");
        let mut problems = Vec::new();
        let settings = file.validate(Path::new("/data"), &mut problems);
        (settings, problems)
    }

    #[test]
    fn sqlite_is_the_default_and_postgres_takes_a_url_and_a_password_file() {
        assert_eq!(validate(""), (StoreSettings::Sqlite, vec![]));
        assert_eq!(
            validate(
                "kind = \"postgres\"\nurl = \"postgres://flotte@db:5432/flotte\"\npassword_file = \"pg.pass\""
            ),
            (
                StoreSettings::Postgres {
                    url: "postgres://flotte@db:5432/flotte".into(),
                    password_file: Some(PathBuf::from("/data/pg.pass")),
                    tls_ca_file: None,
                },
                vec![]
            )
        );
    }

    #[test]
    fn every_store_problem_is_reported_and_a_password_in_the_url_is_refused_unquoted() {
        let (_, problems) = validate("url = \"postgres://a@b/c\"");
        assert_eq!(problems.len(), 1, "{problems:?}");
        let (_, problems) = validate("tls_ca_file = \"pg-ca.pem\"");
        assert!(problems[0].contains("tls_ca_file"), "{problems:?}");
        let (settings, problems) = validate(
            "kind = \"postgres\"\nurl = \"postgres://a@b/c\"\ntls_ca_file = \"pg-ca.pem\"",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert!(
            matches!(settings, StoreSettings::Postgres { tls_ca_file: Some(file), .. } if file == Path::new("/data/pg-ca.pem"))
        );
        let (_, problems) = validate("kind = \"postgres\"");
        assert!(problems[0].contains("needs url"), "{problems:?}");
        let (_, problems) = validate("kind = \"postgres\"\nurl = \"postgres://a:hunter2@b/c\"");
        assert!(problems[0].contains("password_file"), "{problems:?}");
        assert!(!problems[0].contains("hunter2"), "{problems:?}");
        let (_, problems) = validate("kind = \"postgres\"\nurl = \"postgres://a@b:notaport/c\"");
        assert!(problems[0].contains("does not parse"), "{problems:?}");
        assert!(toml::from_str::<StoreConfigFile>("kind = \"mysql\"").is_err());
        assert!(toml::from_str::<StoreConfigFile>("host = \"db\"").is_err());
    }

    #[test]
    fn a_password_file_loses_its_newline_and_an_oversized_one_is_refused() {
        let directory = super::super::sqlite::tests::TemporaryDirectory::new();
        let path = directory.0.join("pass");
        std::fs::write(&path, "s3cret\n").expect("write");
        assert_eq!(read_password(&path).expect("read"), "s3cret");
        std::fs::write(&path, vec![b'x'; 5000]).expect("write");
        assert!(read_password(&path).is_err());
    }
}
