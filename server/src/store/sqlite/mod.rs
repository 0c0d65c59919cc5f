//! SQLite implementation of the store traits: one file in the data dir, WAL
//! mode, one connection behind an async mutex, every call run on the
//! blocking pool once it holds the connection, so that the async runtime
//! never waits on disk and callers wait as queued futures, not as threads.
//!
//! This file holds opening (pragmas, then the numbered schema migrations of
//! `migrations`), the connection and the write metrics, the row helpers
//! shared by every aggregate, the mapping of `rusqlite` errors to
//! [`StoreError`] (no driver type crosses the trait), and the `Store`
//! trait's dispatch to one file per aggregate (tokens, machines, operators
//! and the deny list, images and release keys, audit); access, repair and
//! rollouts implement their own traits in their own files.

mod access;
mod audit;
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
use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Row};
use uuid::Uuid;

use crate::metrics::StoreMetrics;

use super::{
    DeniedEntry, DesiredImageRecord, ImageRecord, Inventory, JoinTokenRecord, MachineRecord,
    OperatorChange, OperatorRecord, ReleaseKeyRecord, StateTransitionRecord, StoreError,
    TokenRedemption, UnixSeconds,
};
use flotte_common::audit::{AuditEvent, AuditFilter, AuditRecord};
use flotte_common::roles::Role;

use machines::machine_from_row;

#[derive(Clone)]
pub struct SqliteStore {
    /// An async mutex, taken before a blocking thread is: calls queue in it,
    /// in order, instead of as blocking-pool threads parked on a lock, which
    /// the reconnect storm had grow to the pool's limit of 512 (BENCHMARKS.md).
    connection: Arc<tokio::sync::Mutex<Connection>>,
    metrics: StoreMetrics,
    /// The change feed: with one process on the file, an in-process channel.
    feed: tokio::sync::broadcast::Sender<crate::store::replicas::FeedEvent>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn labels_to_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_owned())
}

/// A stored text that does not parse as the domain type it holds.
fn conversion_error(error: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(error))
}

fn labels_from_json(text: &str) -> rusqlite::Result<BTreeMap<String, String>> {
    serde_json::from_str(text).map_err(conversion_error)
}

/// Every row of a query without parameters, converted by `row`.
fn query_all<T>(
    connection: &Connection,
    sql: &str,
    row: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut statement = connection.prepare(sql)?;
    let rows = statement
        .query_map([], row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The one row of `sql` (which selects by `?1 = key`), if any.
fn select_one<T>(
    connection: &Connection,
    sql: &str,
    key: &str,
    row: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<T>> {
    connection.query_row(sql, [key], row).optional()
}

/// A primary-key clash as the domain's `AlreadyExists`.
fn already_exists(error: rusqlite::Error, what: String) -> StoreError {
    match error {
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::AlreadyExists(what)
        }
        other => other.into(),
    }
}

/// Every `rusqlite` error becomes a domain [`StoreError`] here, at the edge
/// of the SQLite backend: a lock held past the busy timeout is a retryable
/// conflict, unreadable stored values are corruption, the rest is the
/// backend failing.
impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match &error {
            rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                    StoreError::Conflict(error.to_string())
                }
                ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                    StoreError::Corrupt(error.to_string())
                }
                ErrorCode::DiskFull => StoreError::DiskFull(error.to_string()),
                _ => StoreError::Backend(error.to_string()),
            },
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(error.to_string()),
            _ => StoreError::Backend(error.to_string()),
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store file and brings its schema to
    /// the latest version (see [`migrations`]). The server opens its store
    /// through `settings::open_store`; tests open files directly.
    #[cfg(test)]
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_metrics(path, StoreMetrics::default())
    }

    /// [`SqliteStore::open`], counting writes into `metrics`.
    pub fn open_with_metrics(path: &Path, metrics: StoreMetrics) -> Result<Self, StoreError> {
        let mut connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations::migrate(&mut connection)?;
        Ok(SqliteStore {
            connection: Arc::new(tokio::sync::Mutex::new(connection)),
            metrics,
            feed: tokio::sync::broadcast::channel(crate::store::replicas::FEED_BUFFER).0,
        })
    }

    /// Runs `operation` on the connection in the blocking pool, once it is
    /// this call's turn.
    async fn with_connection<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let mut connection = Arc::clone(&self.connection).lock_owned().await;
        tokio::task::spawn_blocking(move || operation(&mut connection))
            .await
            .map_err(|error| StoreError::Task(error.to_string()))?
    }

    /// Every row of a parameterless query.
    async fn read_all<T: Send + 'static>(
        &self,
        sql: &'static str,
        row: fn(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        self.with_connection(move |connection| query_all(connection, sql, row))
            .await
    }

    /// The row of a query selecting by `?1 = key`, if any.
    async fn read_one<T: Send + 'static>(
        &self,
        sql: &'static str,
        key: String,
        row: fn(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>, StoreError> {
        self.with_connection(move |connection| Ok(select_one(connection, sql, &key, row)?))
            .await
    }

    async fn write<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let result = self.with_connection(operation).await;
        self.metrics.writes.inc();
        self.metrics
            .write_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

crate::store::dispatch_store_to_aggregates!(SqliteStore);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::contract::store_contract_suite;

    /// Removes a test's data dir when dropped.
    pub(crate) struct TemporaryDirectory(pub(crate) std::path::PathBuf);

    impl Drop for TemporaryDirectory {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl TemporaryDirectory {
        pub(crate) fn new() -> Self {
            let path = std::env::temp_dir().join(format!("flotte-store-test-{}", Uuid::new_v4()));
            std::fs::create_dir_all(&path).expect("create a temporary directory");
            TemporaryDirectory(path)
        }
    }

    /// The contract suite's factory: an empty store in a directory of its own.
    async fn fresh_sqlite_store() -> (SqliteStore, TemporaryDirectory) {
        let directory = TemporaryDirectory::new();
        let store = SqliteStore::open(&directory.0.join("flotte.db")).expect("open a new store");
        (store, directory)
    }

    store_contract_suite!(fresh_sqlite_store);

    #[test]
    fn sqlite_errors_become_domain_errors() {
        let failure = |code| {
            StoreError::from(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        assert!(failure(rusqlite::ffi::SQLITE_BUSY).is_retryable());
        assert!(failure(rusqlite::ffi::SQLITE_LOCKED).is_retryable());
        assert!(matches!(
            failure(rusqlite::ffi::SQLITE_CORRUPT),
            StoreError::Corrupt(_)
        ));
        assert!(matches!(
            failure(rusqlite::ffi::SQLITE_FULL),
            StoreError::DiskFull(_)
        ));
        assert!(matches!(
            StoreError::from(conversion_error(std::fmt::Error)),
            StoreError::Corrupt(_)
        ));
    }
}
