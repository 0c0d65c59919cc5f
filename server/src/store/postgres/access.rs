//! PostgreSQL implementation of [`AccessStore`]: every mutation bumps the
//! single-row policy version inside its own transaction (the row lock that
//! UPDATE takes orders concurrent mutations), and the snapshot is read in
//! one REPEATABLE READ transaction so that its rows match its version.

use deadpool_postgres::Transaction;
use tokio_postgres::{IsolationLevel, Row};

use super::{
    already_exists, as_bigint, column, convert_rows, json_column, to_json, unsigned_column,
    uuid_column, PostgresStore,
};
use crate::store::access::{
    AccessSnapshot, AccessStore, GrantRecord, MachineAccessRecord, UserKeyRecord, UserRecord,
    UserRevocation,
};
use crate::store::{StoreError, UnixSeconds};

/// Bumps the policy version inside `transaction`; returns the new version.
async fn bump_version(transaction: &Transaction<'_>) -> Result<u64, StoreError> {
    let row = transaction
        .query_one(
            "UPDATE access_policy_version SET version = version + 1 WHERE id = 1
             RETURNING version",
            &[],
        )
        .await?;
    unsigned_column(&row, "version")
}

fn user_from_row(row: &Row) -> Result<UserRecord, StoreError> {
    Ok(UserRecord {
        name: column(row, "name")?,
        created_at: column(row, "created_at")?,
        created_by: column(row, "created_by")?,
        revoked_at: column(row, "revoked_at")?,
    })
}

fn key_from_row(row: &Row) -> Result<UserKeyRecord, StoreError> {
    Ok(UserKeyRecord {
        user: column(row, "user")?,
        fingerprint: column(row, "fingerprint")?,
        key_type: column(row, "key_type")?,
        public_key: column(row, "public_key")?,
        comment: column(row, "comment")?,
        added_at: column(row, "added_at")?,
    })
}

fn grant_from_row(row: &Row) -> Result<GrantRecord, StoreError> {
    Ok(GrantRecord {
        id: column(row, "id")?,
        user: column(row, "user")?,
        selector: column(row, "selector")?,
        login: column(row, "login")?,
        expires_at: column(row, "expires_at")?,
        created_at: column(row, "created_at")?,
        created_by: column(row, "created_by")?,
    })
}

fn machine_access_from_row(row: &Row) -> Result<MachineAccessRecord, StoreError> {
    Ok(MachineAccessRecord {
        machine_id: uuid_column(row, "machine_id")?,
        applied_version: unsigned_column(row, "applied_version")?,
        applied_at: column(row, "applied_at")?,
        missing_logins: json_column(row, "missing_logins")?,
        found: json_column(row, "found")?,
        refused: json_column(row, "refused")?,
    })
}

async fn insert_key(transaction: &Transaction<'_>, key: &UserKeyRecord) -> Result<(), StoreError> {
    transaction
        .execute(
            "INSERT INTO user_keys (\"user\", fingerprint, key_type, public_key, comment, added_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &key.user,
                &key.fingerprint,
                &key.key_type,
                &key.public_key,
                &key.comment,
                &key.added_at,
            ],
        )
        .await
        .map_err(|error| {
            already_exists(
                error,
                format!("key {} of user {}", key.fingerprint, key.user),
            )
        })?;
    Ok(())
}

#[async_trait::async_trait]
impl AccessStore for PostgresStore {
    async fn insert_user(
        &self,
        user: &UserRecord,
        keys: &[UserKeyRecord],
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        transaction
            .execute(
                "INSERT INTO users (name, created_at, created_by, revoked_at)
                 VALUES ($1, $2, $3, $4)",
                &[
                    &user.name,
                    &user.created_at,
                    &user.created_by,
                    &user.revoked_at,
                ],
            )
            .await
            .map_err(|error| already_exists(error, format!("user {}", user.name)))?;
        for key in keys {
            insert_key(&transaction, key).await?;
        }
        let version = bump_version(&transaction).await?;
        transaction.commit().await?;
        Ok(version)
    }

    async fn insert_user_key(&self, key: &UserKeyRecord) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        insert_key(&transaction, key).await?;
        let version = bump_version(&transaction).await?;
        transaction.commit().await?;
        Ok(version)
    }

    async fn remove_user_key(
        &self,
        user: &str,
        fingerprint: &str,
    ) -> Result<Option<(UserKeyRecord, u64)>, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        let Some(row) = transaction
            .query_opt(
                "DELETE FROM user_keys WHERE \"user\" = $1 AND fingerprint = $2 RETURNING *",
                &[&user, &fingerprint],
            )
            .await?
        else {
            return Ok(None);
        };
        let key = key_from_row(&row)?;
        let version = bump_version(&transaction).await?;
        transaction.commit().await?;
        Ok(Some((key, version)))
    }

    async fn insert_grant(&self, grant: &GrantRecord) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        transaction
            .execute(
                "INSERT INTO grants (id, \"user\", selector, login, expires_at, created_at,
                    created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &grant.id,
                    &grant.user,
                    &grant.selector,
                    &grant.login,
                    &grant.expires_at,
                    &grant.created_at,
                    &grant.created_by,
                ],
            )
            .await
            .map_err(|error| already_exists(error, format!("grant {}", grant.id)))?;
        let version = bump_version(&transaction).await?;
        transaction.commit().await?;
        Ok(version)
    }

    async fn remove_grant(&self, id: &str) -> Result<Option<(GrantRecord, u64)>, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        let Some(row) = transaction
            .query_opt("DELETE FROM grants WHERE id = $1 RETURNING *", &[&id])
            .await?
        else {
            return Ok(None);
        };
        let grant = grant_from_row(&row)?;
        let version = bump_version(&transaction).await?;
        transaction.commit().await?;
        Ok(Some((grant, version)))
    }

    async fn revoke_user(
        &self,
        name: &str,
        at: UnixSeconds,
    ) -> Result<Option<UserRevocation>, StoreError> {
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        // Locking the user row first: a key or grant added meanwhile waits
        // for the revocation (its foreign key needs this row).
        let exists = transaction
            .query_opt("SELECT 1 FROM users WHERE name = $1 FOR UPDATE", &[&name])
            .await?;
        if exists.is_none() {
            return Ok(None);
        }
        let grants_removed = transaction
            .execute("DELETE FROM grants WHERE \"user\" = $1", &[&name])
            .await?;
        let keys_removed = transaction
            .execute("DELETE FROM user_keys WHERE \"user\" = $1", &[&name])
            .await?;
        transaction
            .execute(
                "UPDATE users SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL",
                &[&name, &at],
            )
            .await?;
        let version = bump_version(&transaction).await?;
        let user = transaction
            .query_one("SELECT * FROM users WHERE name = $1", &[&name])
            .await?;
        let user = user_from_row(&user)?;
        transaction.commit().await?;
        Ok(Some(UserRevocation {
            user,
            grants_removed: u32::try_from(grants_removed).unwrap_or(u32::MAX),
            keys_removed: u32::try_from(keys_removed).unwrap_or(u32::MAX),
            version,
        }))
    }

    async fn access_snapshot(&self) -> Result<AccessSnapshot, StoreError> {
        let mut client = self.client().await?;
        let transaction = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let version = transaction
            .query_one(
                "SELECT version FROM access_policy_version WHERE id = 1",
                &[],
            )
            .await?;
        let users = transaction
            .query("SELECT * FROM users ORDER BY name", &[])
            .await?;
        let keys = transaction
            .query(
                "SELECT * FROM user_keys ORDER BY \"user\", added_at, fingerprint",
                &[],
            )
            .await?;
        let grants = transaction
            .query("SELECT * FROM grants ORDER BY created_at, id", &[])
            .await?;
        transaction.commit().await?;
        Ok(AccessSnapshot {
            version: unsigned_column(&version, "version")?,
            users: convert_rows(&users, user_from_row)?,
            keys: convert_rows(&keys, key_from_row)?,
            grants: convert_rows(&grants, grant_from_row)?,
        })
    }

    async fn record_machine_access(
        &self,
        records: &[MachineAccessRecord],
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let _write = self.write_timer();
        let transaction = client.transaction().await?;
        let statement = transaction
            .prepare_cached(
                "INSERT INTO machine_access (machine_id, applied_version, applied_at,
                    missing_logins, found, refused) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (machine_id) DO UPDATE SET applied_version = $2, applied_at = $3,
                    missing_logins = $4, found = $5, refused = $6",
            )
            .await?;
        for record in records {
            transaction
                .execute(
                    &statement,
                    &[
                        &record.machine_id.to_string(),
                        &as_bigint(record.applied_version),
                        &record.applied_at,
                        &to_json(&record.missing_logins)?,
                        &to_json(&record.found)?,
                        &to_json(&record.refused)?,
                    ],
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn machine_access(&self) -> Result<Vec<MachineAccessRecord>, StoreError> {
        self.read_all("SELECT * FROM machine_access", &[], machine_access_from_row)
            .await
    }
}
