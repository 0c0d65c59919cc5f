//! SQLite implementation of [`Store`]: one file in the data dir, WAL mode,
//! one connection behind a mutex, every call run on the blocking pool so that
//! the async runtime never waits on disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};
use uuid::Uuid;

use crate::metrics::StoreMetrics;

use super::{
    classify_token_refusal, DeniedEntry, DeniedKind, DesiredImageRecord, ImageRecord, Inventory,
    JoinTokenRecord, MachineRecord, OperatorRecord, ReleaseKeyRecord, StateTransitionRecord, Store,
    StoreError, TokenRedemption, UnixSeconds,
};
use flotte_common::audit::{seal, AuditEvent, AuditFilter, AuditRecord};
use flotte_common::roles::Role;

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS join_tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL,
    zone TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    uses_allowed INTEGER NOT NULL,
    uses_done INTEGER NOT NULL,
    revoked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    zone TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    enrolled_with_token TEXT NOT NULL,
    certificate_serial TEXT NOT NULL,
    previous_certificate_serial TEXT NOT NULL DEFAULT '',
    certificate_not_after INTEGER NOT NULL,
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    kernel TEXT NOT NULL,
    arch TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    boot_time INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    desired_version INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'unknown',
    state_reason TEXT NOT NULL DEFAULT '',
    state_since INTEGER NOT NULL DEFAULT 0,
    retired_at INTEGER,
    desired_image TEXT
);
CREATE TABLE IF NOT EXISTS images (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    manifest_json BLOB NOT NULL,
    signature BLOB NOT NULL,
    signing_key TEXT NOT NULL,
    pushed_at INTEGER NOT NULL,
    pushed_by TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS machine_transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS machine_transitions_by_machine ON machine_transitions (machine_id, seq);
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    certificate_serial TEXT NOT NULL,
    certificate_not_after INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS deny_list (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT NOT NULL,
    denied_at INTEGER NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE TABLE IF NOT EXISTS release_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    public_key_base64 TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    added_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    arguments_json TEXT NOT NULL,
    result TEXT NOT NULL,
    previous_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);
";

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

pub(super) fn labels_to_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_owned())
}

/// A stored text that does not parse as the domain type it holds.
pub(super) fn conversion_error(
    error: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(error))
}

pub(super) fn labels_from_json(text: &str) -> rusqlite::Result<BTreeMap<String, String>> {
    serde_json::from_str(text).map_err(conversion_error)
}

fn operator_from_row(row: &Row<'_>) -> rusqlite::Result<OperatorRecord> {
    Ok(OperatorRecord {
        name: row.get("name")?,
        role: row
            .get::<_, String>("role")?
            .parse::<Role>()
            .map_err(conversion_error)?,
        created_at: row.get("created_at")?,
        created_by: row.get("created_by")?,
        certificate_serial: row.get("certificate_serial")?,
        certificate_not_after: row.get("certificate_not_after")?,
        revoked_at: row.get("revoked_at")?,
    })
}

fn denied_from_row(row: &Row<'_>) -> rusqlite::Result<DeniedEntry> {
    let kind = match row.get::<_, String>("kind")?.as_str() {
        "serial" => DeniedKind::Serial,
        "identity" => DeniedKind::Identity,
        other => {
            return Err(conversion_error(StoreError::Corrupt(format!(
                "unknown deny-list kind {other:?}"
            ))))
        }
    };
    Ok(DeniedEntry {
        kind,
        value: row.get("value")?,
        reason: row.get("reason")?,
        denied_at: row.get("denied_at")?,
    })
}

fn release_key_from_row(row: &Row<'_>) -> rusqlite::Result<ReleaseKeyRecord> {
    Ok(ReleaseKeyRecord {
        id: row.get("id")?,
        name: row.get("name")?,
        public_key_base64: row.get("public_key_base64")?,
        added_at: row.get("added_at")?,
        added_by: row.get("added_by")?,
    })
}

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        seq: row.get::<_, i64>("seq")?.max(0) as u64,
        event: AuditEvent {
            at: row.get("at")?,
            actor: row.get("actor")?,
            role: row.get("role")?,
            action: row.get("action")?,
            arguments_json: row.get("arguments_json")?,
            result: row.get("result")?,
        },
        previous_hash: row.get("previous_hash")?,
        hash: row.get("hash")?,
    })
}

/// Adds deny-list entries inside an open transaction (an entry already
/// there keeps its first reason).
fn insert_denied(
    transaction: &rusqlite::Transaction<'_>,
    denied: &[DeniedEntry],
) -> rusqlite::Result<()> {
    let mut statement = transaction.prepare(
        "INSERT OR IGNORE INTO deny_list (kind, value, reason, denied_at) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for entry in denied.iter().filter(|entry| !entry.value.is_empty()) {
        statement.execute(params![
            entry.kind.as_str(),
            entry.value,
            entry.reason,
            entry.denied_at
        ])?;
    }
    Ok(())
}

/// Every row of a query without parameters, converted by `row`.
pub(super) fn query_all<T>(
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
pub(super) fn select_one<T>(
    connection: &Connection,
    sql: &str,
    key: &str,
    row: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<T>> {
    connection.query_row(sql, [key], row).optional()
}

/// One revocation as one transaction: stamps the row keyed `key` with `at`
/// (the first stamp wins) and, if the row exists, adds `denied` to the deny
/// list. Returns the row as it is now.
fn stamp_and_deny<T>(
    connection: &mut Connection,
    stamp_sql: &str,
    select_sql: &str,
    key: &str,
    at: UnixSeconds,
    denied: &[DeniedEntry],
    row: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>, StoreError> {
    let transaction = connection.transaction()?;
    transaction.execute(stamp_sql, params![key, at])?;
    let stamped = select_one(&transaction, select_sql, key, row)?;
    if stamped.is_some() {
        insert_denied(&transaction, denied)?;
    }
    transaction.commit()?;
    Ok(stamped)
}

/// A primary-key clash as the domain's `AlreadyExists`.
pub(super) fn already_exists(error: rusqlite::Error, what: String) -> StoreError {
    match error {
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::AlreadyExists(what)
        }
        other => StoreError::Database(other),
    }
}

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<JoinTokenRecord> {
    Ok(JoinTokenRecord {
        id: row.get("id")?,
        secret_hash: row.get("secret_hash")?,
        labels: labels_from_json(&row.get::<_, String>("labels")?)?,
        zone: row.get("zone")?,
        created_at: row.get("created_at")?,
        expires_at: row.get("expires_at")?,
        uses_allowed: row.get("uses_allowed")?,
        uses_done: row.get("uses_done")?,
        revoked: row.get("revoked")?,
    })
}

fn image_from_row(row: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        name: row.get("name")?,
        version: row.get("version")?,
        digest: row.get("digest")?,
        size: row.get::<_, i64>("size")?.max(0) as u64,
        manifest_json: row.get("manifest_json")?,
        signature: row.get("signature")?,
        signing_key: row.get("signing_key")?,
        pushed_at: row.get("pushed_at")?,
        pushed_by: row.get("pushed_by")?,
    })
}

pub(super) fn machine_from_row(row: &Row<'_>) -> rusqlite::Result<MachineRecord> {
    let id: String = row.get("id")?;
    let id = Uuid::parse_str(&id).map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(error))
    })?;
    Ok(MachineRecord {
        id,
        labels: labels_from_json(&row.get::<_, String>("labels")?)?,
        zone: row.get("zone")?,
        enrolled_at: row.get("enrolled_at")?,
        enrolled_with_token: row.get("enrolled_with_token")?,
        certificate_serial: row.get("certificate_serial")?,
        previous_certificate_serial: row.get("previous_certificate_serial")?,
        certificate_not_after: row.get("certificate_not_after")?,
        inventory: Inventory {
            hostname: row.get("hostname")?,
            os: row.get("os")?,
            kernel: row.get("kernel")?,
            arch: row.get("arch")?,
            agent_version: row.get("agent_version")?,
            boot_time: row.get("boot_time")?,
        },
        last_seen: row.get("last_seen")?,
        desired_version: row.get::<_, i64>("desired_version")?.max(0) as u64,
        state: row.get("state")?,
        state_reason: row.get("state_reason")?,
        state_since: row.get("state_since")?,
        retired_at: row.get("retired_at")?,
        desired_image: match row.get::<_, Option<String>>("desired_image")? {
            Some(text) => Some(serde_json::from_str(&text).map_err(|error| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    Box::new(error),
                )
            })?),
            None => None,
        },
    })
}

impl SqliteStore {
    /// Opens (creating if needed) the store file and applies the schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_metrics(path, StoreMetrics::default())
    }

    /// [`SqliteStore::open`], counting writes into `metrics`.
    pub fn open_with_metrics(path: &Path, metrics: StoreMetrics) -> Result<Self, StoreError> {
        let connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(SCHEMA)?;
        connection.execute_batch(super::sqlite_repair::REPAIR_SCHEMA)?;
        connection.execute_batch(super::sqlite_rollouts::ROLLOUT_SCHEMA)?;
        connection.execute_batch(super::sqlite_access::ACCESS_SCHEMA)?;
        Ok(SqliteStore {
            connection: Arc::new(Mutex::new(connection)),
            metrics,
        })
    }

    /// Runs `operation` on the connection in the blocking pool.
    pub(super) async fn with_connection<T, F>(&self, operation: F) -> Result<T, StoreError>
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
    pub(super) async fn read_all<T: Send + 'static>(
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

    pub(super) async fn write<T, F>(&self, operation: F) -> Result<T, StoreError>
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
        let token = token.clone();
        self.write(move |connection| {
            connection.execute(
                "INSERT INTO join_tokens (id, secret_hash, labels, zone, created_at, expires_at,
                    uses_allowed, uses_done, revoked) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    token.id,
                    token.secret_hash,
                    labels_to_json(&token.labels),
                    token.zone,
                    token.created_at,
                    token.expires_at,
                    token.uses_allowed,
                    token.uses_done,
                    token.revoked
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        self.read_all(
            "SELECT * FROM join_tokens ORDER BY created_at, id",
            token_from_row,
        )
        .await
    }

    async fn revoke_token(&self, id: &str) -> Result<Option<JoinTokenRecord>, StoreError> {
        let id = id.to_owned();
        self.write(move |connection| {
            connection.execute("UPDATE join_tokens SET revoked = 1 WHERE id = ?1", [&id])?;
            Ok(select_one(
                connection,
                "SELECT * FROM join_tokens WHERE id = ?1",
                &id,
                token_from_row,
            )?)
        })
        .await
    }

    async fn redeem_token(
        &self,
        secret_hash: &str,
        now: UnixSeconds,
    ) -> Result<TokenRedemption, StoreError> {
        let secret_hash = secret_hash.to_owned();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            let changed = transaction.execute(
                "UPDATE join_tokens SET uses_done = uses_done + 1
                 WHERE secret_hash = ?1 AND revoked = 0 AND expires_at > ?2
                   AND uses_done < uses_allowed",
                params![secret_hash, now],
            )?;
            let record = select_one(
                &transaction,
                "SELECT * FROM join_tokens WHERE secret_hash = ?1",
                &secret_hash,
                token_from_row,
            )?;
            transaction.commit()?;
            Ok(match (changed, record) {
                (1, Some(record)) => TokenRedemption::Redeemed(record),
                (_, record) => {
                    TokenRedemption::Refused(classify_token_refusal(record.as_ref(), now))
                }
            })
        })
        .await
    }

    async fn insert_machine(&self, machine: &MachineRecord) -> Result<(), StoreError> {
        let machine = machine.clone();
        self.write(move |connection| {
            connection.execute(
                "INSERT INTO machines (id, labels, zone, enrolled_at, enrolled_with_token,
                    certificate_serial, certificate_not_after, hostname, os, kernel, arch,
                    agent_version, boot_time, last_seen, desired_version, state, state_reason,
                    state_since, retired_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                    ?18, ?19)",
                params![
                    machine.id.to_string(),
                    labels_to_json(&machine.labels),
                    machine.zone,
                    machine.enrolled_at,
                    machine.enrolled_with_token,
                    machine.certificate_serial,
                    machine.certificate_not_after,
                    machine.inventory.hostname,
                    machine.inventory.os,
                    machine.inventory.kernel,
                    machine.inventory.arch,
                    machine.inventory.agent_version,
                    machine.inventory.boot_time,
                    machine.last_seen,
                    machine.desired_version as i64,
                    machine.state,
                    machine.state_reason,
                    machine.state_since,
                    machine.retired_at,
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn machine(&self, id: Uuid) -> Result<Option<MachineRecord>, StoreError> {
        self.read_one(
            "SELECT * FROM machines WHERE id = ?1",
            id.to_string().to_string(),
            machine_from_row,
        )
        .await
    }

    async fn machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        self.read_all(
            "SELECT * FROM machines ORDER BY zone, hostname, id",
            machine_from_row,
        )
        .await
    }

    async fn record_certificate(
        &self,
        id: Uuid,
        serial: &str,
        not_after: UnixSeconds,
    ) -> Result<(), StoreError> {
        let serial = serial.to_owned();
        self.write(move |connection| {
            connection.execute(
                "UPDATE machines SET previous_certificate_serial = certificate_serial,
                    certificate_serial = ?2, certificate_not_after = ?3 WHERE id = ?1",
                params![id.to_string(), serial, not_after],
            )?;
            Ok(())
        })
        .await
    }

    async fn record_inventory(
        &self,
        id: Uuid,
        inventory: &Inventory,
        seen_at: UnixSeconds,
    ) -> Result<(), StoreError> {
        let inventory = inventory.clone();
        self.write(move |connection| {
            connection.execute(
                "UPDATE machines SET hostname = ?2, os = ?3, kernel = ?4, arch = ?5,
                    agent_version = ?6, boot_time = ?7, last_seen = ?8 WHERE id = ?1",
                params![
                    id.to_string(),
                    inventory.hostname,
                    inventory.os,
                    inventory.kernel,
                    inventory.arch,
                    inventory.agent_version,
                    inventory.boot_time,
                    seen_at
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn update_labels(
        &self,
        id: Uuid,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<MachineRecord>, StoreError> {
        let labels = labels_to_json(labels);
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            transaction.execute(
                "UPDATE machines SET labels = ?2, desired_version = desired_version + 1 WHERE id = ?1",
                params![id.to_string(), labels],
            )?;
            let machine = select_one(&transaction, "SELECT * FROM machines WHERE id = ?1", &id.to_string(), machine_from_row)?;
            transaction.commit()?;
            Ok(machine)
        })
        .await
    }

    async fn record_transition(
        &self,
        transition: &StateTransitionRecord,
    ) -> Result<(), StoreError> {
        let transition = transition.clone();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            transaction.execute(
                "INSERT INTO machine_transitions (machine_id, at, from_state, to_state, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    transition.machine_id.to_string(),
                    transition.at,
                    transition.from,
                    transition.to,
                    transition.reason
                ],
            )?;
            transaction.execute(
                "UPDATE machines SET state = ?2, state_reason = ?3, state_since = ?4 WHERE id = ?1",
                params![
                    transition.machine_id.to_string(),
                    transition.to,
                    transition.reason,
                    transition.at
                ],
            )?;
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    async fn transitions(
        &self,
        machine_id: Uuid,
        limit: u32,
    ) -> Result<Vec<StateTransitionRecord>, StoreError> {
        self.with_connection(move |connection| {
            let mut statement = connection.prepare(
                "SELECT at, from_state, to_state, reason FROM machine_transitions
                 WHERE machine_id = ?1 ORDER BY seq DESC LIMIT ?2",
            )?;
            let transitions = statement
                .query_map(params![machine_id.to_string(), limit], |row| {
                    Ok(StateTransitionRecord {
                        machine_id,
                        at: row.get(0)?,
                        from: row.get(1)?,
                        to: row.get(2)?,
                        reason: row.get(3)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(transitions)
        })
        .await
    }

    async fn insert_image(&self, image: &ImageRecord) -> Result<bool, StoreError> {
        let image = image.clone();
        self.write(move |connection| {
            let inserted = connection.execute(
                "INSERT OR IGNORE INTO images (name, version, digest, size, manifest_json, signature,
                    signing_key, pushed_at, pushed_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    image.name,
                    image.version,
                    image.digest,
                    image.size as i64,
                    image.manifest_json,
                    image.signature,
                    image.signing_key,
                    image.pushed_at,
                    image.pushed_by
                ],
            )?;
            Ok(inserted == 1)
        })
        .await
    }

    async fn images(&self, name: Option<&str>) -> Result<Vec<ImageRecord>, StoreError> {
        let name = name.map(str::to_owned);
        self.with_connection(move |connection| {
            let mut statement = connection.prepare(
                "SELECT * FROM images WHERE (?1 IS NULL OR name = ?1) ORDER BY pushed_at DESC, name, version",
            )?;
            let images = statement
                .query_map([name], image_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(images)
        })
        .await
    }

    async fn image(&self, name: &str, version: &str) -> Result<Option<ImageRecord>, StoreError> {
        let (name, version) = (name.to_owned(), version.to_owned());
        self.with_connection(move |connection| {
            Ok(connection
                .query_row(
                    "SELECT * FROM images WHERE name = ?1 AND version = ?2",
                    [name, version],
                    image_from_row,
                )
                .optional()?)
        })
        .await
    }

    async fn set_desired_image(
        &self,
        id: Uuid,
        image: Option<&DesiredImageRecord>,
    ) -> Result<Option<MachineRecord>, StoreError> {
        let image = image
            .map(serde_json::to_string)
            .transpose()
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            transaction.execute(
                "UPDATE machines SET desired_image = ?2, desired_version = desired_version + 1 WHERE id = ?1",
                params![id.to_string(), image],
            )?;
            let machine = transaction
                .query_row(
                    "SELECT * FROM machines WHERE id = ?1",
                    [id.to_string()],
                    machine_from_row,
                )
                .optional()?;
            transaction.commit()?;
            Ok(machine)
        })
        .await
    }

    async fn record_last_seen(&self, seen: &[(Uuid, UnixSeconds)]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let seen = seen.to_vec();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            {
                let mut statement = transaction
                    .prepare("UPDATE machines SET last_seen = MAX(last_seen, ?2) WHERE id = ?1")?;
                for (id, at) in &seen {
                    statement.execute(params![id.to_string(), at])?;
                }
            }
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    async fn retire_machine(
        &self,
        id: Uuid,
        at: UnixSeconds,
        denied: &[DeniedEntry],
    ) -> Result<Option<MachineRecord>, StoreError> {
        let denied = denied.to_vec();
        self.write(move |connection| {
            stamp_and_deny(
                connection,
                "UPDATE machines SET retired_at = COALESCE(retired_at, ?2) WHERE id = ?1",
                "SELECT * FROM machines WHERE id = ?1",
                &id.to_string(),
                at,
                &denied,
                machine_from_row,
            )
        })
        .await
    }

    async fn insert_operator(&self, operator: &OperatorRecord) -> Result<(), StoreError> {
        let operator = operator.clone();
        self.write(move |connection| {
            connection
                .execute(
                    "INSERT INTO operators (name, role, created_at, created_by, certificate_serial,
                        certificate_not_after, revoked_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        operator.name,
                        operator.role.as_str(),
                        operator.created_at,
                        operator.created_by,
                        operator.certificate_serial,
                        operator.certificate_not_after,
                        operator.revoked_at
                    ],
                )
                .map_err(|error| already_exists(error, format!("operator {}", operator.name)))?;
            Ok(())
        })
        .await
    }

    async fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError> {
        self.read_one(
            "SELECT * FROM operators WHERE name = ?1",
            name.to_owned(),
            operator_from_row,
        )
        .await
    }

    async fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        self.read_all("SELECT * FROM operators ORDER BY name", operator_from_row)
            .await
    }

    async fn set_operator_role(
        &self,
        name: &str,
        role: Role,
    ) -> Result<Option<OperatorRecord>, StoreError> {
        let name = name.to_owned();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            transaction.execute(
                "UPDATE operators SET role = ?2 WHERE name = ?1",
                params![name, role.as_str()],
            )?;
            let operator = select_one(
                &transaction,
                "SELECT * FROM operators WHERE name = ?1",
                &name,
                operator_from_row,
            )?;
            transaction.commit()?;
            Ok(operator)
        })
        .await
    }

    async fn revoke_operator(
        &self,
        name: &str,
        at: UnixSeconds,
        denied: &[DeniedEntry],
    ) -> Result<Option<OperatorRecord>, StoreError> {
        let name = name.to_owned();
        let denied = denied.to_vec();
        self.write(move |connection| {
            stamp_and_deny(
                connection,
                "UPDATE operators SET revoked_at = COALESCE(revoked_at, ?2) WHERE name = ?1",
                "SELECT * FROM operators WHERE name = ?1",
                &name,
                at,
                &denied,
                operator_from_row,
            )
        })
        .await
    }

    async fn denied_entries(&self) -> Result<Vec<DeniedEntry>, StoreError> {
        self.read_all(
            "SELECT * FROM deny_list ORDER BY denied_at, kind, value",
            denied_from_row,
        )
        .await
    }

    async fn insert_release_key(&self, key: &ReleaseKeyRecord) -> Result<(), StoreError> {
        let key = key.clone();
        self.write(move |connection| {
            connection
                .execute(
                    "INSERT INTO release_keys (id, name, public_key_base64, added_at, added_by)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        key.id,
                        key.name,
                        key.public_key_base64,
                        key.added_at,
                        key.added_by
                    ],
                )
                .map_err(|error| already_exists(error, format!("release key {}", key.id)))?;
            Ok(())
        })
        .await
    }

    async fn remove_release_key(&self, id: &str) -> Result<Option<ReleaseKeyRecord>, StoreError> {
        let id = id.to_owned();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            let key = select_one(
                &transaction,
                "SELECT * FROM release_keys WHERE id = ?1",
                &id,
                release_key_from_row,
            )?;
            transaction.execute("DELETE FROM release_keys WHERE id = ?1", [&id])?;
            transaction.commit()?;
            Ok(key)
        })
        .await
    }

    async fn release_keys(&self) -> Result<Vec<ReleaseKeyRecord>, StoreError> {
        self.read_all(
            "SELECT * FROM release_keys ORDER BY added_at, rowid",
            release_key_from_row,
        )
        .await
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
        let event = event.clone();
        self.write(move |connection| {
            // IMMEDIATE: two appends must not both read the same previous entry.
            let transaction =
                connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let previous: Option<(i64, String)> = transaction
                .query_row(
                    "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let record = seal(
                event,
                previous
                    .as_ref()
                    .map(|(seq, hash)| ((*seq).max(0) as u64, hash.as_str())),
            );
            transaction.execute(
                "INSERT INTO audit_log (seq, at, actor, role, action, arguments_json, result,
                    previous_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    record.seq as i64,
                    record.event.at,
                    record.event.actor,
                    record.event.role,
                    record.event.action,
                    record.event.arguments_json,
                    record.event.result,
                    record.previous_hash,
                    record.hash
                ],
            )?;
            transaction.commit()?;
            Ok(record)
        })
        .await
    }

    async fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let filter = filter.clone();
        self.with_connection(move |connection| {
            let mut statement = connection.prepare(
                "SELECT * FROM audit_log WHERE at >= ?1 AND (?2 IS NULL OR actor = ?2) ORDER BY seq",
            )?;
            let entries = statement
                .query_map(
                    params![filter.since.unwrap_or(i64::MIN), filter.actor],
                    audit_from_row,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(entries)
        })
        .await
    }

    fn write_count(&self) -> u64 {
        self.metrics.writes.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(flotte_common::audit::verify_chain(&all).unwrap().entries, 3);
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
