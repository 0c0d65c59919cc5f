//! SQLite implementation of [`IntegrityStore`]: table `image_verifications`.

use rusqlite::{params, Row};

use super::{conversion_error, SqliteStore};
use crate::store::integrity::{ImageVerificationRecord, IntegrityStore};
use crate::store::StoreError;

fn verification_from_row(row: &Row<'_>) -> rusqlite::Result<ImageVerificationRecord> {
    let unsigned = |name: &str| -> rusqlite::Result<u64> {
        u64::try_from(row.get::<_, i64>(name)?).map_err(conversion_error)
    };
    Ok(ImageVerificationRecord {
        machine_id: uuid::Uuid::parse_str(&row.get::<_, String>("machine_id")?)
            .map_err(conversion_error)?,
        received_at: row.get("received_at")?,
        request_id: row.get("request_id")?,
        result: row.get("result")?,
        started_at: row.get("started_at")?,
        duration_ms: unsigned("duration_ms")?,
        bytes_read: unsigned("bytes_read")?,
        details: serde_json::from_str(&row.get::<_, String>("details")?)
            .map_err(conversion_error)?,
    })
}

#[async_trait::async_trait]
impl IntegrityStore for SqliteStore {
    async fn record_verification(
        &self,
        verification: &ImageVerificationRecord,
    ) -> Result<bool, StoreError> {
        let verification = verification.clone();
        let details = serde_json::to_string(&verification.details)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let signed = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.write(move |connection| {
            let written = connection.execute(
                "INSERT OR REPLACE INTO image_verifications (machine_id, received_at, request_id,
                    result, started_at, duration_ms, bytes_read, details)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8 WHERE EXISTS (SELECT 1 FROM machines WHERE id = ?1)",
                params![
                    verification.machine_id.to_string(),
                    verification.received_at,
                    verification.request_id,
                    verification.result,
                    verification.started_at,
                    signed(verification.duration_ms),
                    signed(verification.bytes_read),
                    details,
                ],
            )?;
            Ok(written == 1)
        })
        .await
    }

    async fn verifications(&self) -> Result<Vec<ImageVerificationRecord>, StoreError> {
        self.read_all(
            "SELECT * FROM image_verifications ORDER BY machine_id",
            verification_from_row,
        )
        .await
    }
}
