//! PostgreSQL implementation of the store traits, for server replicas that
//! share one database: a `deadpool-postgres` pool of `tokio-postgres`
//! connections, the numbered schema migrations of `migrations` (the same
//! numbers as SQLite's) applied at connect.
//!
//! This file holds connecting (the password comes apart from the URL and is
//! never logged or shown), the pool and the write metrics, the row helpers
//! shared by every aggregate, the mapping of driver errors to
//! [`StoreError`] (no driver type crosses the trait), and the `Store`
//! trait's dispatch to one file per aggregate; access, repair and rollouts
//! implement their own traits in their own files.
//!
//! Concurrency: transactions run at PostgreSQL's default READ COMMITTED,
//! and every conditional operation serialises on an explicit lock taken
//! first in its transaction (a row lock on the machine, or a transaction
//! advisory lock per rule: the audit chain, the last admin, rollout
//! creation), so that the check and the write see the same state on every
//! replica. A serialization failure or deadlock still surfaces as the
//! retryable [`StoreError::Conflict`].

mod access;
mod audit;
mod blobs;
mod forensics;
mod images;
mod integrity;
mod machines;
mod migrations;
mod operators;
mod repair;
mod replicas;
mod rollouts;
mod tokens;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::FromSql;
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use crate::metrics::StoreMetrics;

use super::{
    DeniedEntry, DesiredImageRecord, ImageRecord, Inventory, JoinTokenRecord, MachineRecord,
    OperatorChange, OperatorRecord, ReleaseKeyRecord, StateTransitionRecord, StoreError,
    TokenRedemption, UnixSeconds,
};
use flotte_common::audit::{AuditEvent, AuditFilter, AuditRecord};
use flotte_common::roles::Role;

/// Connections one server process holds at most: enough for concurrent
/// admin calls and the background flushes, small enough that several
/// replicas stay far below PostgreSQL's default `max_connections` (100).
const POOL_SIZE: usize = 16;

/// How long a call waits for a free connection or a new one before failing.
const POOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Keys of the transaction advisory locks that serialise the rules which
/// span several rows (each one rule; any value unique to it will do).
mod lock_keys {
    /// Reading the audit chain's head and appending after it.
    pub(super) const AUDIT_CHAIN: i64 = 0x666c_6f74_0001;
    /// Counting the active admins and changing one of them.
    pub(super) const ADMINS: i64 = 0x666c_6f74_0002;
    /// Checking that no active rollout holds a machine and creating one.
    pub(super) const ROLLOUT_CREATION: i64 = 0x666c_6f74_0003;
    /// Applying the schema migrations (replicas may start together).
    pub(super) const MIGRATIONS: i64 = 0x666c_6f74_0004;
    /// Taking or renewing the leader-only loops' lease.
    pub(super) const LEADERSHIP: i64 = 0x666c_6f74_0005;
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    metrics: StoreMetrics,
    /// How to open the change feed's own connection (`LISTEN` needs one
    /// that is never returned to the pool).
    config: tokio_postgres::Config,
    /// TLS for every connection, when `[store] tls_ca_file` asks for it.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    feed: replicas::ChangeFeed,
}

/// Never prints the connection settings: they may hold the password.
impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

/// Every driver error becomes a domain [`StoreError`] here, at the edge of
/// the PostgreSQL backend: a serialization failure or a deadlock (the
/// server rolled the transaction back) is a retryable conflict, the rest
/// is the backend failing.
impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        match error.code() {
            Some(code)
                if *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                StoreError::Conflict(describe(&error))
            }
            Some(code) if *code == SqlState::DISK_FULL => StoreError::DiskFull(describe(&error)),
            // The connection itself failed (refused, reset, closed): not a
            // refusal by the server (a password missing or wrong is one).
            None if error.is_closed() || caused_by_io(&error) => {
                StoreError::Unavailable(describe(&error))
            }
            _ => StoreError::Backend(describe(&error)),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(error) => error.into(),
            deadpool_postgres::PoolError::Timeout(_) => {
                StoreError::Unavailable(format!("PostgreSQL connection pool: {error}"))
            }
            other => StoreError::Backend(format!("PostgreSQL connection pool: {other}")),
        }
    }
}

/// Whether an I/O error (a refused, reset or timed-out connection) is
/// among the causes of `error`.
fn caused_by_io(error: &tokio_postgres::Error) -> bool {
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if current.is::<std::io::Error>() {
            return true;
        }
        cause = current.source();
    }
    false
}

/// The driver's message with the server's own, when there is one (the
/// driver's `Display` says only "db error").
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(database) => format!("PostgreSQL: {database}"),
        None => {
            // The driver's own message is often only the step that failed
            // ("error performing TLS handshake"): the causes say why.
            let mut text = format!("PostgreSQL: {error}");
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text.push_str(": ");
                    text.push_str(&cause_text);
                }
                source = cause.source();
            }
            text
        }
    }
}

/// A unique-key clash as the domain's `AlreadyExists`.
fn already_exists(error: tokio_postgres::Error, what: String) -> StoreError {
    if error.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        StoreError::AlreadyExists(what)
    } else {
        error.into()
    }
}

fn corrupt(column: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("column {column}: {error}"))
}

/// One column of a row, as `T`.
fn column<'row, T: FromSql<'row>>(row: &'row Row, name: &str) -> Result<T, StoreError> {
    row.try_get(name).map_err(|error| corrupt(name, error))
}

/// A BIGINT column holding an unsigned count or version.
fn unsigned_column<T: TryFrom<i64>>(row: &Row, name: &str) -> Result<T, StoreError> {
    let value: i64 = column(row, name)?;
    T::try_from(value).map_err(|_| corrupt(name, format!("{value} is out of range")))
}

fn uuid_column(row: &Row, name: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(column::<&str>(row, name)?).map_err(|error| corrupt(name, error))
}

fn optional_uuid_column(row: &Row, name: &str) -> Result<Option<Uuid>, StoreError> {
    column::<Option<&str>>(row, name)?
        .map(|text| Uuid::parse_str(text).map_err(|error| corrupt(name, error)))
        .transpose()
}

fn json_column<T: serde::de::DeserializeOwned>(row: &Row, name: &str) -> Result<T, StoreError> {
    serde_json::from_str(column::<&str>(row, name)?).map_err(|error| corrupt(name, error))
}

fn optional_json_column<T: serde::de::DeserializeOwned>(
    row: &Row,
    name: &str,
) -> Result<Option<T>, StoreError> {
    column::<Option<&str>>(row, name)?
        .map(|text| serde_json::from_str(text).map_err(|error| corrupt(name, error)))
        .transpose()
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|error| StoreError::Corrupt(error.to_string()))
}

fn labels_to_json(labels: &BTreeMap<String, String>) -> Result<String, StoreError> {
    to_json(labels)
}

/// A count or version as the BIGINT PostgreSQL stores.
fn as_bigint<T: TryInto<i64>>(value: T) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// Converts every row with `convert`.
fn convert_rows<T>(
    rows: &[Row],
    convert: fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(convert).collect()
}

/// Counts one write and its duration when dropped, whatever its outcome.
struct WriteTimer<'store> {
    metrics: &'store StoreMetrics,
    started: Instant,
}

impl Drop for WriteTimer<'_> {
    fn drop(&mut self) {
        self.metrics.writes.inc();
        self.metrics
            .write_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// What is wrong with a `[store] url`, for the settings' validation: it
/// must parse, and must not hold the password (the URL is shown in logs).
/// The problems never quote the URL.
pub(super) fn postgres_url_problems(url: &str) -> Vec<String> {
    match url.parse::<tokio_postgres::Config>() {
        Err(error) => vec![format!("store: the PostgreSQL url does not parse: {error}")],
        Ok(config) if config.get_password().is_some() => vec![
            "store: the PostgreSQL url holds a password: put it in a password_file instead".into(),
        ],
        Ok(_) => Vec::new(),
    }
}

impl PostgresStore {
    /// Connects to the database named by `url` (`postgres://user@host:port/database`;
    /// `password`, if given, is set apart from it so that the URL can be
    /// logged), over TLS with `tls` if given (then required), and brings its
    /// schema to the latest version (see [`migrations`]).
    pub async fn connect(
        url: &str,
        password: Option<String>,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|error| {
            // The driver's message names the faulty option, never the URL
            // (which may hold a password).
            StoreError::Backend(format!("the PostgreSQL url does not parse: {error}"))
        })?;
        if let Some(password) = password {
            config.password(password);
        }
        config.connect_timeout(POOL_TIMEOUT);
        let tls = tls.map(tokio_postgres_rustls::MakeRustlsConnect::new);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Some(tls) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Manager::from_config(config.clone(), tls.clone(), manager_config)
            }
            None => Manager::from_config(config.clone(), NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|error| StoreError::Backend(format!("PostgreSQL connection pool: {error}")))?;
        let mut client = pool.get().await?;
        migrations::migrate(&mut client).await?;
        Ok(PostgresStore {
            pool,
            metrics: StoreMetrics::default(),
            config,
            tls,
            feed: replicas::ChangeFeed::default(),
        })
    }

    /// This store, counting its writes into `metrics` (the server's registry).
    pub fn with_metrics(self, metrics: StoreMetrics) -> Self {
        PostgresStore { metrics, ..self }
    }

    /// A connection from the pool.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Starts counting one write (see [`WriteTimer`]).
    fn write_timer(&self) -> WriteTimer<'_> {
        WriteTimer {
            metrics: &self.metrics,
            started: Instant::now(),
        }
    }

    /// Every row of `sql` with `parameters`, converted by `convert`.
    async fn read_all<T>(
        &self,
        sql: &str,
        parameters: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        convert: fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let client = self.client().await?;
        let rows = client.query(sql, parameters).await?;
        convert_rows(&rows, convert)
    }

    /// The one row of `sql` with `parameters`, if any, converted by `convert`.
    async fn read_one<T>(
        &self,
        sql: &str,
        parameters: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        convert: fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let client = self.client().await?;
        let row = client.query_opt(sql, parameters).await?;
        row.as_ref().map(convert).transpose()
    }
}

/// Takes the transaction advisory lock `key` (released at commit or rollback).
async fn lock_rule(
    transaction: &deadpool_postgres::Transaction<'_>,
    key: i64,
) -> Result<(), StoreError> {
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&key])
        .await?;
    Ok(())
}

crate::store::dispatch_store_to_aggregates!(PostgresStore);

#[cfg(test)]
mod cluster;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::store_contract_suite;
    use crate::store::Store;

    /// The contract suite's factory: a new, empty database in the test
    /// binary's throwaway cluster (see [`super::cluster`]); `None` when
    /// PostgreSQL is missing and the environment asks to skip.
    async fn fresh_postgres_store() -> Option<(PostgresStore, ())> {
        let url = cluster::fresh_database_url().await?;
        let store = PostgresStore::connect(&url, None, None)
            .await
            .expect("connect to the fresh database");
        Some((store, ()))
    }

    store_contract_suite!(skippable fresh_postgres_store);

    /// A CA and a certificate it signed for 127.0.0.1, as PEM: (CA, server
    /// certificate, server key).
    fn test_certificates() -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        (ca.pem(), server.pem(), server_key.serialize_pem())
    }

    #[tokio::test]
    async fn the_store_speaks_tls_to_postgres_trusting_only_its_configured_ca() {
        let directory = crate::store::TemporaryDirectory::new();
        let (ca, certificate, key) = test_certificates();
        std::fs::write(directory.0.join("server.pem"), certificate).unwrap();
        std::fs::write(directory.0.join("server.key"), key).unwrap();
        let Some(cluster) = cluster::private_cluster_with_tls(&directory.0) else {
            return;
        };
        let url = cluster.fresh_database_url().await;
        let ca_file = directory.0.join("ca.pem");
        std::fs::write(&ca_file, &ca).unwrap();
        let tls = crate::store::settings::postgres_tls(&ca_file).unwrap();
        let store = PostgresStore::connect(&url, None, Some(tls)).await.unwrap();
        let client = store.client().await.unwrap();
        let encrypted: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(encrypted, "the pool's connection is not encrypted");
        // The change feed's own connection is encrypted too.
        let mut events = crate::store::replicas::ReplicaStore::subscribe(&store);
        let first = tokio::time::timeout(std::time::Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, crate::store::replicas::FeedEvent::Resynchronise);
        let listeners: i64 = client
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
                 WHERE ssl AND query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(listeners, 1, "the feed listens over TLS");
        // A server whose certificate another CA signed is refused.
        let (other_ca, _, _) = test_certificates();
        let other_file = directory.0.join("other-ca.pem");
        std::fs::write(&other_file, other_ca).unwrap();
        let other = crate::store::settings::postgres_tls(&other_file).unwrap();
        let refused = PostgresStore::connect(&url, None, Some(other))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().to_lowercase().contains("certificate"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn postgres_keeps_blobs_whole_and_verified() {
        let Some((store, ())) = fresh_postgres_store().await else {
            return;
        };
        crate::images::contract::blobs_are_visible_only_whole_and_verified(&store).await;
        let client = store.client().await.unwrap();
        let chunks: i64 = client
            .query_one("SELECT COUNT(*) FROM blob_chunks", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            chunks, 3,
            "one blob of three chunks; nothing of the refused ones"
        );
    }

    #[tokio::test]
    async fn the_password_is_sent_apart_from_the_url_and_never_shown() {
        let password = "correct-horse-battery";
        let Some(url) = cluster::password_role_url(password).await else {
            return;
        };
        PostgresStore::connect(&url, Some(password.into()), None)
            .await
            .expect("connect with the password given apart from the URL");
        let refused = PostgresStore::connect(&url, None, None)
            .await
            .expect_err("without a password the role is refused");
        assert!(matches!(refused, StoreError::Backend(_)), "{refused:?}");
        let wrong = PostgresStore::connect(&url, Some("wrong-horse".into()), None)
            .await
            .expect_err("a wrong password is refused");
        let message = wrong.to_string();
        assert!(
            message.contains("password authentication failed"),
            "{message}"
        );
        assert!(!message.contains("wrong-horse"), "{message}");
        let unparsable =
            PostgresStore::connect("postgres://host:notaport/db", Some("secret".into()), None)
                .await
                .expect_err("a bad URL is refused");
        let message = unparsable.to_string();
        assert!(message.contains("does not parse"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }

    #[tokio::test]
    async fn reopening_a_migrated_database_keeps_its_data() {
        let Some(url) = cluster::fresh_database_url().await else {
            return;
        };
        let first = PostgresStore::connect(&url, None, None)
            .await
            .expect("connect");
        first
            .insert_token(&crate::store::contract::token("t1", "h1", 1))
            .await
            .expect("insert a token");
        let second = PostgresStore::connect(&url, None, None)
            .await
            .expect("reconnect");
        let tokens = second.list_tokens().await.expect("list tokens");
        assert_eq!(tokens.len(), 1);
    }
}
