//! Pushed images and trusted release keys in PostgreSQL.

use tokio_postgres::Row;

use super::{already_exists, as_bigint, column, unsigned_column, PostgresStore};
use crate::store::{ImageRecord, ReleaseKeyRecord, StoreError};

fn image_from_row(row: &Row) -> Result<ImageRecord, StoreError> {
    Ok(ImageRecord {
        name: column(row, "name")?,
        version: column(row, "version")?,
        digest: column(row, "digest")?,
        size: unsigned_column(row, "size")?,
        manifest_json: column(row, "manifest_json")?,
        signature: column(row, "signature")?,
        signing_key: column(row, "signing_key")?,
        pushed_at: column(row, "pushed_at")?,
        pushed_by: column(row, "pushed_by")?,
    })
}

fn release_key_from_row(row: &Row) -> Result<ReleaseKeyRecord, StoreError> {
    Ok(ReleaseKeyRecord {
        id: column(row, "id")?,
        name: column(row, "name")?,
        public_key_base64: column(row, "public_key_base64")?,
        added_at: column(row, "added_at")?,
        added_by: column(row, "added_by")?,
    })
}

pub(super) async fn insert_image(
    store: &PostgresStore,
    image: &ImageRecord,
) -> Result<bool, StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    let inserted = client
        .execute(
            "INSERT INTO images (name, version, digest, size, manifest_json, signature,
                signing_key, pushed_at, pushed_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT DO NOTHING",
            &[
                &image.name,
                &image.version,
                &image.digest,
                &as_bigint(image.size),
                &image.manifest_json,
                &image.signature,
                &image.signing_key,
                &image.pushed_at,
                &image.pushed_by,
            ],
        )
        .await?;
    Ok(inserted == 1)
}

pub(super) async fn images(
    store: &PostgresStore,
    name: Option<&str>,
) -> Result<Vec<ImageRecord>, StoreError> {
    store
        .read_all(
            "SELECT * FROM images WHERE ($1::TEXT IS NULL OR name = $1)
             ORDER BY pushed_at DESC, name, version",
            &[&name],
            image_from_row,
        )
        .await
}

pub(super) async fn image(
    store: &PostgresStore,
    name: &str,
    version: &str,
) -> Result<Option<ImageRecord>, StoreError> {
    store
        .read_one(
            "SELECT * FROM images WHERE name = $1 AND version = $2",
            &[&name, &version],
            image_from_row,
        )
        .await
}

pub(super) async fn insert_release_key(
    store: &PostgresStore,
    key: &ReleaseKeyRecord,
) -> Result<(), StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    client
        .execute(
            "INSERT INTO release_keys (id, name, public_key_base64, added_at, added_by)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &key.id,
                &key.name,
                &key.public_key_base64,
                &key.added_at,
                &key.added_by,
            ],
        )
        .await
        .map_err(|error| already_exists(error, format!("release key {}", key.id)))?;
    Ok(())
}

pub(super) async fn remove_release_key(
    store: &PostgresStore,
    id: &str,
) -> Result<Option<ReleaseKeyRecord>, StoreError> {
    let client = store.client().await?;
    let _write = store.write_timer();
    let row = client
        .query_opt("DELETE FROM release_keys WHERE id = $1 RETURNING *", &[&id])
        .await?;
    row.as_ref().map(release_key_from_row).transpose()
}

pub(super) async fn release_keys(
    store: &PostgresStore,
) -> Result<Vec<ReleaseKeyRecord>, StoreError> {
    // SQLite breaks ties by insertion order (rowid); PostgreSQL has no such
    // stable order, so ties go by id.
    store
        .read_all(
            "SELECT * FROM release_keys ORDER BY added_at, id",
            &[],
            release_key_from_row,
        )
        .await
}
