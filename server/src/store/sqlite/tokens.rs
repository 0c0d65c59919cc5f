//! Join tokens in SQLite: minting, listing, revoking, and the conditional
//! update that spends one use of a token atomically.

use rusqlite::{params, Row};

use super::{labels_from_json, labels_to_json, select_one, SqliteStore};
use crate::store::{
    classify_token_refusal, JoinTokenRecord, StoreError, TokenRedemption, UnixSeconds,
};

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
        revoked_at: row.get("revoked_at")?,
        last_used_at: row.get("last_used_at")?,
    })
}

pub(super) async fn insert_token(
    store: &SqliteStore,
    token: &JoinTokenRecord,
) -> Result<(), StoreError> {
    let token = token.clone();
    store
        .write(move |connection| {
            connection.execute(
                "INSERT INTO join_tokens (id, secret_hash, labels, zone, created_at, expires_at,
                uses_allowed, uses_done, revoked, revoked_at, last_used_at)
                VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    token.id,
                    token.secret_hash,
                    labels_to_json(&token.labels),
                    token.zone,
                    token.created_at,
                    token.expires_at,
                    token.uses_allowed,
                    token.uses_done,
                    token.revoked,
                    token.revoked_at,
                    token.last_used_at
                ],
            )?;
            Ok(())
        })
        .await
}

pub(super) async fn list_tokens(store: &SqliteStore) -> Result<Vec<JoinTokenRecord>, StoreError> {
    store
        .read_all(
            "SELECT * FROM join_tokens ORDER BY created_at, id",
            token_from_row,
        )
        .await
}

pub(super) async fn revoke_token(
    store: &SqliteStore,
    id: &str,
    now: UnixSeconds,
) -> Result<Option<JoinTokenRecord>, StoreError> {
    let id = id.to_owned();
    store
        .write(move |connection| {
            connection.execute(
                "UPDATE join_tokens SET revoked = 1, revoked_at = COALESCE(revoked_at, ?2)
                 WHERE id = ?1",
                params![id, now],
            )?;
            Ok(select_one(
                connection,
                "SELECT * FROM join_tokens WHERE id = ?1",
                &id,
                token_from_row,
            )?)
        })
        .await
}

pub(super) async fn redeem_token(
    store: &SqliteStore,
    secret_hash: &str,
    now: UnixSeconds,
) -> Result<TokenRedemption, StoreError> {
    let secret_hash = secret_hash.to_owned();
    store
        .write(move |connection| {
            let transaction = connection.transaction()?;
            let changed = transaction.execute(
                "UPDATE join_tokens SET uses_done = uses_done + 1, last_used_at = ?2
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
