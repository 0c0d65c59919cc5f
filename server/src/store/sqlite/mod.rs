//! SQLite implementation of the store traits: one file in the data dir, WAL
//! mode, one connection behind a mutex, every call run on the blocking pool
//! so that the async runtime never waits on disk.
//!
//! This file holds opening (pragmas, schema), the connection and the write
//! metrics, the row helpers shared by every aggregate, and the `Store`
//! trait's dispatch to one file per aggregate (tokens, machines, operators
//! and the deny list, images and release keys, audit); access, repair and
//! rollouts implement their own traits in their own files. Nothing outside
//! `store` sees `rusqlite`.

mod access;
mod audit;
mod images;
mod machines;
mod migrations;
mod operators;
mod repair;
mod rollouts;
mod tokens;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Row};
use uuid::Uuid;

use crate::metrics::StoreMetrics;

use super::{
    DeniedEntry, DesiredImageRecord, ImageRecord, Inventory, JoinTokenRecord, MachineRecord,
    OperatorRecord, ReleaseKeyRecord, StateTransitionRecord, Store, StoreError, TokenRedemption,
    UnixSeconds,
};
use crate::audit::{AuditEvent, AuditFilter, AuditRecord};
use crate::roles::Role;

use machines::machine_from_row;

#[derive(Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
    metrics: StoreMetrics,
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
    /// the latest version (see [`migrations`]).
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
            connection: Arc::new(Mutex::new(connection)),
            metrics,
        })
    }

    /// Runs `operation` on the connection in the blocking pool.
    async fn with_connection<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            let mut guard = connection
                .lock()
                .map_err(|_| StoreError::Task("store mutex poisoned".into()))?;
            operation(&mut guard)
        })
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

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn insert_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError> {
        tokens::insert_token(self, token).await
    }

    async fn list_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        tokens::list_tokens(self).await
    }

    async fn revoke_token(&self, id: &str) -> Result<Option<JoinTokenRecord>, StoreError> {
        tokens::revoke_token(self, id).await
    }

    async fn redeem_token(
        &self,
        secret_hash: &str,
        now: UnixSeconds,
    ) -> Result<TokenRedemption, StoreError> {
        tokens::redeem_token(self, secret_hash, now).await
    }

    async fn insert_machine(&self, machine: &MachineRecord) -> Result<(), StoreError> {
        machines::insert_machine(self, machine).await
    }

    async fn machine(&self, id: Uuid) -> Result<Option<MachineRecord>, StoreError> {
        machines::machine(self, id).await
    }

    async fn machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        machines::machines(self).await
    }

    async fn record_certificate(
        &self,
        id: Uuid,
        serial: &str,
        not_after: UnixSeconds,
    ) -> Result<(), StoreError> {
        machines::record_certificate(self, id, serial, not_after).await
    }

    async fn record_inventory(
        &self,
        id: Uuid,
        inventory: &Inventory,
        seen_at: UnixSeconds,
    ) -> Result<(), StoreError> {
        machines::record_inventory(self, id, inventory, seen_at).await
    }

    async fn update_labels(
        &self,
        id: Uuid,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<MachineRecord>, StoreError> {
        machines::update_labels(self, id, labels).await
    }

    async fn record_transition(
        &self,
        transition: &StateTransitionRecord,
    ) -> Result<(), StoreError> {
        machines::record_transition(self, transition).await
    }

    async fn transitions(
        &self,
        machine_id: Uuid,
        limit: u32,
    ) -> Result<Vec<StateTransitionRecord>, StoreError> {
        machines::transitions(self, machine_id, limit).await
    }

    async fn insert_image(&self, image: &ImageRecord) -> Result<bool, StoreError> {
        images::insert_image(self, image).await
    }

    async fn images(&self, name: Option<&str>) -> Result<Vec<ImageRecord>, StoreError> {
        images::images(self, name).await
    }

    async fn image(&self, name: &str, version: &str) -> Result<Option<ImageRecord>, StoreError> {
        images::image(self, name, version).await
    }

    async fn set_desired_image(
        &self,
        id: Uuid,
        image: Option<&DesiredImageRecord>,
    ) -> Result<Option<MachineRecord>, StoreError> {
        machines::set_desired_image(self, id, image).await
    }

    async fn record_last_seen(&self, seen: &[(Uuid, UnixSeconds)]) -> Result<(), StoreError> {
        machines::record_last_seen(self, seen).await
    }

    async fn retire_machine(
        &self,
        id: Uuid,
        at: UnixSeconds,
        denied: &[DeniedEntry],
    ) -> Result<Option<MachineRecord>, StoreError> {
        machines::retire_machine(self, id, at, denied).await
    }

    async fn insert_operator(&self, operator: &OperatorRecord) -> Result<(), StoreError> {
        operators::insert_operator(self, operator).await
    }

    async fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError> {
        operators::operator(self, name).await
    }

    async fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        operators::operators(self).await
    }

    async fn set_operator_role(
        &self,
        name: &str,
        role: Role,
    ) -> Result<Option<OperatorRecord>, StoreError> {
        operators::set_operator_role(self, name, role).await
    }

    async fn revoke_operator(
        &self,
        name: &str,
        at: UnixSeconds,
        denied: &[DeniedEntry],
    ) -> Result<Option<OperatorRecord>, StoreError> {
        operators::revoke_operator(self, name, at, denied).await
    }

    async fn denied_entries(&self) -> Result<Vec<DeniedEntry>, StoreError> {
        operators::denied_entries(self).await
    }

    async fn insert_release_key(&self, key: &ReleaseKeyRecord) -> Result<(), StoreError> {
        images::insert_release_key(self, key).await
    }

    async fn remove_release_key(&self, id: &str) -> Result<Option<ReleaseKeyRecord>, StoreError> {
        images::remove_release_key(self, id).await
    }

    async fn release_keys(&self) -> Result<Vec<ReleaseKeyRecord>, StoreError> {
        images::release_keys(self).await
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
        audit::append_audit(self, event).await
    }

    async fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        audit::audit_entries(self, filter).await
    }

    fn write_count(&self) -> u64 {
        self.metrics.writes.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeniedKind;

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
            StoreError::Backend(_)
        ));
        assert!(matches!(
            StoreError::from(conversion_error(std::fmt::Error)),
            StoreError::Corrupt(_)
        ));
    }

    fn temp_store() -> (SqliteStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("flotte-store-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        (SqliteStore::open(&dir.join("flotte.db")).unwrap(), dir)
    }

    fn token(uses_allowed: u32, expires_at: i64) -> JoinTokenRecord {
        JoinTokenRecord {
            id: "abcd".into(),
            secret_hash: "hash".into(),
            labels: [("env".to_owned(), "prod".to_owned())].into(),
            zone: "dc1".into(),
            created_at: 10,
            expires_at,
            uses_allowed,
            uses_done: 0,
            revoked: false,
        }
    }

    #[tokio::test]
    async fn a_single_use_token_is_redeemed_once() {
        let (store, dir) = temp_store();
        store.insert_token(&token(1, 1000)).await.unwrap();
        let first = store.redeem_token("hash", 100).await.unwrap();
        assert!(
            matches!(first, TokenRedemption::Redeemed(ref t) if t.uses_done == 1 && t.labels["env"] == "prod")
        );
        let second = store.redeem_token("hash", 100).await.unwrap();
        assert!(matches!(
            second,
            TokenRedemption::Refused(super::super::TokenRefusal::UsedUp { .. })
        ));
        let unknown = store.redeem_token("other", 100).await.unwrap();
        assert_eq!(
            unknown,
            TokenRedemption::Refused(super::super::TokenRefusal::Unknown)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn expired_and_revoked_tokens_are_refused() {
        let (store, dir) = temp_store();
        store.insert_token(&token(5, 50)).await.unwrap();
        assert!(matches!(
            store.redeem_token("hash", 100).await.unwrap(),
            TokenRedemption::Refused(super::super::TokenRefusal::Expired { .. })
        ));
        let revoked = store.revoke_token("abcd").await.unwrap().unwrap();
        assert!(revoked.revoked);
        assert!(store.revoke_token("nope").await.unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn machines_round_trip_and_last_seen_batches() {
        let (store, dir) = temp_store();
        let machine = MachineRecord {
            id: Uuid::new_v4(),
            labels: [("role".to_owned(), "web".to_owned())].into(),
            zone: "dc2".into(),
            enrolled_at: 5,
            enrolled_with_token: "abcd".into(),
            certificate_serial: "01".into(),
            previous_certificate_serial: String::new(),
            certificate_not_after: 99,
            inventory: Inventory::default(),
            last_seen: 5,
            desired_version: 1,
            state: "unknown".into(),
            state_reason: String::new(),
            state_since: 0,
            retired_at: None,
            desired_image: None,
        };
        store.insert_machine(&machine).await.unwrap();
        let writes_before = store.write_count();
        store.record_last_seen(&[(machine.id, 42)]).await.unwrap();
        store.record_last_seen(&[(machine.id, 7)]).await.unwrap();
        assert_eq!(store.write_count(), writes_before + 2);
        store
            .record_certificate(machine.id, "02", 200)
            .await
            .unwrap();
        let relabelled = store
            .update_labels(machine.id, &[("role".to_owned(), "db".to_owned())].into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(relabelled.desired_version, 2);
        assert_eq!(relabelled.labels["role"], "db");
        assert!(store
            .update_labels(Uuid::new_v4(), &BTreeMap::new())
            .await
            .unwrap()
            .is_none());
        let loaded = store.machine(machine.id).await.unwrap().unwrap();
        assert_eq!(loaded.last_seen, 42, "last_seen never goes backwards");
        assert_eq!(
            (
                loaded.certificate_serial.as_str(),
                loaded.previous_certificate_serial.as_str()
            ),
            ("02", "01")
        );
        assert_eq!(loaded.labels["role"], "db");
        assert_eq!(store.machines().await.unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn operators_deny_list_release_keys_and_audit_round_trip() {
        let (store, dir) = temp_store();
        let bob = OperatorRecord {
            name: "bob".into(),
            role: Role::Viewer,
            created_at: 1,
            created_by: "admin".into(),
            certificate_serial: "0b".into(),
            certificate_not_after: 100,
            revoked_at: None,
        };
        store.insert_operator(&bob).await.unwrap();
        assert!(matches!(
            store.insert_operator(&bob).await,
            Err(StoreError::AlreadyExists(_))
        ));
        let promoted = store
            .set_operator_role("bob", Role::Operator)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(promoted.role, Role::Operator);
        let denied = [DeniedEntry {
            kind: DeniedKind::Identity,
            value: "spiffe://td/operator/bob".into(),
            reason: "operator bob was revoked".into(),
            denied_at: 5,
        }];
        let revoked = store
            .revoke_operator("bob", 5, &denied)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(revoked.revoked_at, Some(5));
        assert!(store
            .revoke_operator("nobody", 5, &denied)
            .await
            .unwrap()
            .is_none());
        assert_eq!(store.denied_entries().await.unwrap(), denied.to_vec());

        let key = ReleaseKeyRecord {
            id: "abc".into(),
            name: "ci".into(),
            public_key_base64: "AAAA".into(),
            added_at: 3,
            added_by: "admin".into(),
        };
        store.insert_release_key(&key).await.unwrap();
        assert!(matches!(
            store.insert_release_key(&key).await,
            Err(StoreError::AlreadyExists(_))
        ));
        assert_eq!(store.release_keys().await.unwrap(), vec![key.clone()]);
        assert_eq!(store.remove_release_key("abc").await.unwrap(), Some(key));
        assert!(store.release_keys().await.unwrap().is_empty());

        for (at, actor) in [(10, "admin"), (20, "bob"), (30, "admin")] {
            store
                .append_audit(&AuditEvent {
                    at,
                    actor: actor.into(),
                    role: "admin".into(),
                    action: "token.create".into(),
                    arguments_json: "{}".into(),
                    result: "ok".into(),
                })
                .await
                .unwrap();
        }
        let all = store.audit_entries(&AuditFilter::default()).await.unwrap();
        assert_eq!(crate::audit::verify_chain(&all).unwrap().entries, 3);
        let filtered = store
            .audit_entries(&AuditFilter {
                since: Some(15),
                actor: Some("admin".into()),
            })
            .await
            .unwrap();
        assert_eq!(
            filtered.iter().map(|entry| entry.seq).collect::<Vec<_>>(),
            vec![3]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
