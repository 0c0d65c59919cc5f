//! Pushed images and trusted release keys in SQLite.

use rusqlite::{params, OptionalExtension, Row};

use super::{already_exists, select_one, SqliteStore};
use crate::store::{ImageRecord, ReleaseKeyRecord, StoreError};

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

fn release_key_from_row(row: &Row<'_>) -> rusqlite::Result<ReleaseKeyRecord> {
    Ok(ReleaseKeyRecord {
        id: row.get("id")?,
        name: row.get("name")?,
        public_key_base64: row.get("public_key_base64")?,
        added_at: row.get("added_at")?,
        added_by: row.get("added_by")?,
    })
}

pub(super) async fn insert_image(
    store: &SqliteStore,
    image: &ImageRecord,
) -> Result<bool, StoreError> {
    let image = image.clone();
    store
        .write(move |connection| {
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

pub(super) async fn images(
    store: &SqliteStore,
    name: Option<&str>,
) -> Result<Vec<ImageRecord>, StoreError> {
    let name = name.map(str::to_owned);
    store.with_connection(move |connection| {
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

pub(super) async fn image(
    store: &SqliteStore,
    name: &str,
    version: &str,
) -> Result<Option<ImageRecord>, StoreError> {
    let (name, version) = (name.to_owned(), version.to_owned());
    store
        .with_connection(move |connection| {
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

pub(super) async fn insert_release_key(
    store: &SqliteStore,
    key: &ReleaseKeyRecord,
) -> Result<(), StoreError> {
    let key = key.clone();
    store
        .write(move |connection| {
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

pub(super) async fn remove_release_key(
    store: &SqliteStore,
    id: &str,
) -> Result<Option<ReleaseKeyRecord>, StoreError> {
    let id = id.to_owned();
    store
        .write(move |connection| {
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

pub(super) async fn release_keys(store: &SqliteStore) -> Result<Vec<ReleaseKeyRecord>, StoreError> {
    store
        .read_all(
            "SELECT * FROM release_keys ORDER BY added_at, rowid",
            release_key_from_row,
        )
        .await
}
