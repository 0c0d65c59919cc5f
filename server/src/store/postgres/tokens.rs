//! Join tokens in PostgreSQL: minting, listing, revoking, and the one
//! conditional UPDATE that spends a use (PostgreSQL re-checks its condition
//! on the row it waited for, so two concurrent uses never both pass).

use tokio_postgres::Row;

use super::{column, json_column, labels_to_json, unsigned_column, PostgresStore};
use crate::store::{
    classify_token_refusal, JoinTokenRecord, StoreError, TokenRedemption, UnixSeconds,
};

fn token_from_row(row: &Row) -> Result<JoinTokenRecord, StoreError> {
    Ok(JoinTokenRecord {
        id: column(row, "id")?,
        secret_hash: column(row, "secret_hash")?,
        labels: json_column(row, "labels")?,
        zone: column(row, "zone")?,
        created_at: column(row, "created_at")?,
        expires_at: column(row, "expires_at")?,
        uses_allowed: unsigned_column(row, "uses_allowed")?,
        uses_done: unsigned_column(row, "uses_done")?,
        revoked: column(row, "revoked")?,
        revoked_at: column(row, "revoked_at")?,
        last_used_at: column(row, "last_used_at")?,
    })
}

pub(super) async fn insert_token(
    store: &PostgresStore,
    token: &JoinTokenRecord,
) -> Result<(), StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    client
        .execute(
            "INSERT INTO join_tokens (id, secret_hash, labels, zone, created_at, expires_at,
                uses_allowed, uses_done, revoked, revoked_at, last_used_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &token.id,
                &token.secret_hash,
                &labels_to_json(&token.labels)?,
                &token.zone,
                &token.created_at,
                &token.expires_at,
                &i64::from(token.uses_allowed),
                &i64::from(token.uses_done),
                &token.revoked,
                &token.revoked_at,
                &token.last_used_at,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn list_tokens(store: &PostgresStore) -> Result<Vec<JoinTokenRecord>, StoreError> {
    store
        .read_all(
            "SELECT * FROM join_tokens ORDER BY created_at, id",
            &[],
            token_from_row,
        )
        .await
}

pub(super) async fn revoke_token(
    store: &PostgresStore,
    id: &str,
    now: UnixSeconds,
) -> Result<Option<JoinTokenRecord>, StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    let row = client
        .query_opt(
            "UPDATE join_tokens SET revoked = TRUE, revoked_at = COALESCE(revoked_at, $2)
             WHERE id = $1 RETURNING *",
            &[&id, &now],
        )
        .await?;
    row.as_ref().map(token_from_row).transpose()
}

pub(super) async fn redeem_token(
    store: &PostgresStore,
    secret_hash: &str,
    now: UnixSeconds,
) -> Result<TokenRedemption, StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    let spent = client
        .query_opt(
            "UPDATE join_tokens SET uses_done = uses_done + 1, last_used_at = $2
             WHERE secret_hash = $1 AND NOT revoked AND expires_at > $2
               AND uses_done < uses_allowed
             RETURNING *",
            &[&secret_hash, &now],
        )
        .await?;
    if let Some(row) = spent {
        return Ok(TokenRedemption::Redeemed(token_from_row(&row)?));
    }
    let record = client
        .query_opt(
            "SELECT * FROM join_tokens WHERE secret_hash = $1",
            &[&secret_hash],
        )
        .await?;
    let record = record.as_ref().map(token_from_row).transpose()?;
    Ok(TokenRedemption::Refused(classify_token_refusal(
        record.as_ref(),
        now,
    )))
}
