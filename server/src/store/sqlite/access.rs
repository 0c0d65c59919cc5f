//! SQLite implementation of [`AccessStore`]: its tables come with the rest
//! of the schema (see `migrations`), and every mutation bumps
//! the single-row policy version inside its own transaction.

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use uuid::Uuid;

use super::SqliteStore;
use super::{already_exists, query_all};
use crate::store::access::{
    AccessSnapshot, AccessStore, FoundKeysRecord, GrantRecord, MachineAccessRecord, UserKeyRecord,
    UserRecord, UserRevocation,
};
use crate::store::{StoreError, UnixSeconds};

/// Bumps the policy version inside `transaction`; returns the new version.
fn bump_version(transaction: &Transaction<'_>) -> rusqlite::Result<u64> {
    transaction.execute(
        "UPDATE access_policy_version SET version = version + 1 WHERE id = 1",
        [],
    )?;
    current_version(transaction)
}

fn current_version(connection: &Connection) -> rusqlite::Result<u64> {
    connection
        .query_row(
            "SELECT version FROM access_policy_version WHERE id = 1",
            [],
            |row| row.get::<_, i64>(0),
        )
        .map(|version| version.max(0) as u64)
}

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        name: row.get("name")?,
        created_at: row.get("created_at")?,
        created_by: row.get("created_by")?,
        revoked_at: row.get("revoked_at")?,
    })
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<UserKeyRecord> {
    Ok(UserKeyRecord {
        user: row.get("user")?,
        fingerprint: row.get("fingerprint")?,
        key_type: row.get("key_type")?,
        public_key: row.get("public_key")?,
        comment: row.get("comment")?,
        added_at: row.get("added_at")?,
    })
}

fn grant_from_row(row: &Row<'_>) -> rusqlite::Result<GrantRecord> {
    Ok(GrantRecord {
        id: row.get("id")?,
        user: row.get("user")?,
        selector: row.get("selector")?,
        login: row.get("login")?,
        expires_at: row.get("expires_at")?,
        created_at: row.get("created_at")?,
        created_by: row.get("created_by")?,
    })
}

fn json_error(error: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(error))
}

fn machine_access_from_row(row: &Row<'_>) -> rusqlite::Result<MachineAccessRecord> {
    let id: String = row.get("machine_id")?;
    let machine_id = Uuid::parse_str(&id).map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(error))
    })?;
    let missing: String = row.get("missing_logins")?;
    let found: String = row.get("found")?;
    let refused: String = row.get("refused")?;
    Ok(MachineAccessRecord {
        machine_id,
        applied_version: row.get::<_, i64>("applied_version")?.max(0) as u64,
        applied_at: row.get("applied_at")?,
        missing_logins: serde_json::from_str(&missing).map_err(json_error)?,
        found: serde_json::from_str::<Vec<FoundKeysRecord>>(&found).map_err(json_error)?,
        refused: serde_json::from_str(&refused).map_err(json_error)?,
    })
}

fn insert_key(transaction: &Transaction<'_>, key: &UserKeyRecord) -> Result<(), StoreError> {
    transaction
        .execute(
            "INSERT INTO user_keys (user, fingerprint, key_type, public_key, comment, added_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                key.user,
                key.fingerprint,
                key.key_type,
                key.public_key,
                key.comment,
                key.added_at
            ],
        )
        .map_err(|error| {
            already_exists(
                error,
                format!("key {} of user {}", key.fingerprint, key.user),
            )
        })?;
    Ok(())
}

const SELECT_GRANT: &str = "SELECT * FROM grants WHERE id = ?1";

#[async_trait::async_trait]
impl AccessStore for SqliteStore {
    async fn insert_user(
        &self,
        user: &UserRecord,
        keys: &[UserKeyRecord],
    ) -> Result<u64, StoreError> {
        let user = user.clone();
        let keys = keys.to_vec();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            transaction
                .execute(
                    "INSERT INTO users (name, created_at, created_by, revoked_at) VALUES (?1, ?2, ?3, ?4)",
                    params![user.name, user.created_at, user.created_by, user.revoked_at],
                )
                .map_err(|error| already_exists(error, format!("user {}", user.name)))?;
            for key in &keys {
                insert_key(&transaction, key)?;
            }
            let version = bump_version(&transaction)?;
            transaction.commit()?;
            Ok(version)
        })
        .await
    }

    async fn insert_user_key(&self, key: &UserKeyRecord) -> Result<u64, StoreError> {
        let key = key.clone();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            insert_key(&transaction, &key)?;
            let version = bump_version(&transaction)?;
            transaction.commit()?;
            Ok(version)
        })
        .await
    }

    async fn remove_user_key(
        &self,
        user: &str,
        fingerprint: &str,
    ) -> Result<Option<(UserKeyRecord, u64)>, StoreError> {
        let user = user.to_owned();
        let fingerprint = fingerprint.to_owned();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            let key = transaction
                .query_row(
                    "SELECT * FROM user_keys WHERE user = ?1 AND fingerprint = ?2",
                    params![user, fingerprint],
                    key_from_row,
                )
                .optional()?;
            let Some(key) = key else {
                return Ok(None);
            };
            transaction.execute(
                "DELETE FROM user_keys WHERE user = ?1 AND fingerprint = ?2",
                params![user, fingerprint],
            )?;
            let version = bump_version(&transaction)?;
            transaction.commit()?;
            Ok(Some((key, version)))
        })
        .await
    }

    async fn insert_grant(&self, grant: &GrantRecord) -> Result<u64, StoreError> {
        let grant = grant.clone();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            transaction
                .execute(
                    "INSERT INTO grants (id, user, selector, login, expires_at, created_at, created_by)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        grant.id,
                        grant.user,
                        grant.selector,
                        grant.login,
                        grant.expires_at,
                        grant.created_at,
                        grant.created_by
                    ],
                )
                .map_err(|error| already_exists(error, format!("grant {}", grant.id)))?;
            let version = bump_version(&transaction)?;
            transaction.commit()?;
            Ok(version)
        })
        .await
    }

    async fn remove_grant(&self, id: &str) -> Result<Option<(GrantRecord, u64)>, StoreError> {
        let id = id.to_owned();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            let grant = transaction
                .query_row(SELECT_GRANT, [&id], grant_from_row)
                .optional()?;
            let Some(grant) = grant else {
                return Ok(None);
            };
            transaction.execute("DELETE FROM grants WHERE id = ?1", [&id])?;
            let version = bump_version(&transaction)?;
            transaction.commit()?;
            Ok(Some((grant, version)))
        })
        .await
    }

    async fn revoke_user(
        &self,
        name: &str,
        at: UnixSeconds,
    ) -> Result<Option<UserRevocation>, StoreError> {
        let name = name.to_owned();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            let exists = transaction
                .query_row("SELECT 1 FROM users WHERE name = ?1", [&name], |_| Ok(()))
                .optional()?;
            if exists.is_none() {
                return Ok(None);
            }
            let grants_removed =
                transaction.execute("DELETE FROM grants WHERE user = ?1", [&name])?;
            let keys_removed =
                transaction.execute("DELETE FROM user_keys WHERE user = ?1", [&name])?;
            transaction.execute(
                "UPDATE users SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
                params![name, at],
            )?;
            let version = bump_version(&transaction)?;
            let user = transaction.query_row(
                "SELECT * FROM users WHERE name = ?1",
                [&name],
                user_from_row,
            )?;
            transaction.commit()?;
            Ok(Some(UserRevocation {
                user,
                grants_removed: u32::try_from(grants_removed).unwrap_or(u32::MAX),
                keys_removed: u32::try_from(keys_removed).unwrap_or(u32::MAX),
                version,
            }))
        })
        .await
    }

    async fn access_snapshot(&self) -> Result<AccessSnapshot, StoreError> {
        self.with_connection(|connection| {
            // One read transaction: the rows match the version read with them.
            let transaction = connection.transaction()?;
            let snapshot = AccessSnapshot {
                version: current_version(&transaction)?,
                users: query_all(
                    &transaction,
                    "SELECT * FROM users ORDER BY name",
                    user_from_row,
                )?,
                keys: query_all(
                    &transaction,
                    "SELECT * FROM user_keys ORDER BY user, added_at, fingerprint",
                    key_from_row,
                )?,
                grants: query_all(
                    &transaction,
                    "SELECT * FROM grants ORDER BY created_at, id",
                    grant_from_row,
                )?,
            };
            transaction.commit()?;
            Ok(snapshot)
        })
        .await
    }

    async fn record_machine_access(
        &self,
        records: &[MachineAccessRecord],
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let records = records.to_vec();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            {
                let mut statement = transaction.prepare(
                    "INSERT INTO machine_access (machine_id, applied_version, applied_at, missing_logins, found, refused)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (machine_id) DO UPDATE SET applied_version = ?2, applied_at = ?3,
                         missing_logins = ?4, found = ?5, refused = ?6",
                )?;
                for record in &records {
                    let missing = serde_json::to_string(&record.missing_logins)
                        .map_err(|error| StoreError::Corrupt(error.to_string()))?;
                    let found = serde_json::to_string(&record.found)
                        .map_err(|error| StoreError::Corrupt(error.to_string()))?;
                    let refused = serde_json::to_string(&record.refused)
                        .map_err(|error| StoreError::Corrupt(error.to_string()))?;
                    statement.execute(params![
                        record.machine_id.to_string(),
                        i64::try_from(record.applied_version).unwrap_or(i64::MAX),
                        record.applied_at,
                        missing,
                        found,
                        refused
                    ])?;
                }
            }
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    async fn machine_access(&self) -> Result<Vec<MachineAccessRecord>, StoreError> {
        self.with_connection(|connection| {
            query_all(
                connection,
                "SELECT * FROM machine_access",
                machine_access_from_row,
            )
        })
        .await
    }
}
