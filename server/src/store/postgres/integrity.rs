//! PostgreSQL implementation of [`IntegrityStore`]: table `image_verifications`.

use tokio_postgres::Row;

use super::{column, json_column, to_json, unsigned_column, uuid_column, PostgresStore};
use crate::store::integrity::{ImageVerificationRecord, IntegrityStore};
use crate::store::StoreError;

fn verification_from_row(row: &Row) -> Result<ImageVerificationRecord, StoreError> {
    Ok(ImageVerificationRecord {
        machine_id: uuid_column(row, "machine_id")?,
        received_at: column(row, "received_at")?,
        request_id: column(row, "request_id")?,
        result: column(row, "result")?,
        started_at: column(row, "started_at")?,
        duration_ms: unsigned_column(row, "duration_ms")?,
        bytes_read: unsigned_column(row, "bytes_read")?,
        details: json_column(row, "details")?,
    })
}

#[async_trait::async_trait]
impl IntegrityStore for PostgresStore {
    async fn record_verification(
        &self,
        verification: &ImageVerificationRecord,
    ) -> Result<bool, StoreError> {
        let details = to_json(&verification.details)?;
        let signed = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let _write = self.write_timer();
        let written = client
            .execute(
                "INSERT INTO image_verifications (machine_id, received_at, request_id, result,
                    started_at, duration_ms, bytes_read, details)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE EXISTS (SELECT 1 FROM machines WHERE id = $1)
                 ON CONFLICT (machine_id) DO UPDATE SET received_at = EXCLUDED.received_at,
                    request_id = EXCLUDED.request_id, result = EXCLUDED.result,
                    started_at = EXCLUDED.started_at, duration_ms = EXCLUDED.duration_ms,
                    bytes_read = EXCLUDED.bytes_read, details = EXCLUDED.details",
                &[
                    &verification.machine_id.to_string(),
                    &verification.received_at,
                    &verification.request_id,
                    &verification.result,
                    &verification.started_at,
                    &signed(verification.duration_ms),
                    &signed(verification.bytes_read),
                    &details,
                ],
            )
            .await?;
        Ok(written == 1)
    }

    async fn verifications(&self) -> Result<Vec<ImageVerificationRecord>, StoreError> {
        self.read_all(
            "SELECT * FROM image_verifications ORDER BY machine_id",
            &[],
            verification_from_row,
        )
        .await
    }
}
