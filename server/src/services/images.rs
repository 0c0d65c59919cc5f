//! Images: a push is checked against the release keys the server trusts
//! before a payload byte is accepted, its payload is written to the blob
//! store (visible only once its size and digest match the manifest), and its
//! record inserted; pushing the same image again is harmless, another
//! payload under a published name and version is refused. Listing counts
//! the machines that last reported running each image.
//!
//! What must never happen here: a payload byte stored for an image whose
//! signature was not verified, or reading the push stream (the edge reads
//! and bounds it, handing chunks to [`ImageUpload`]).

use flotte_proto::image::{verify_manifest, ImageReference, Manifest};
use flotte_proto::release_keys::{parse_release_key, ReleasePublicKey};

use crate::images::{BlobError, BlobWriter};
use crate::store::{ImageRecord, StoreError};
use crate::ServerState;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The signature does not verify against a trusted release key, or the
    /// manifest is invalid.
    #[error("image refused: {0}")]
    Refused(flotte_proto::image::ImageError),
    #[error("{reference} already exists with another payload ({existing_digest}); publish a new version")]
    OtherPayloadExists {
        reference: String,
        existing_digest: String,
    },
    #[error("{0} was pushed concurrently")]
    PushedConcurrently(String),
    /// The payload does not match its manifest (size, digest).
    #[error("payload refused: {0}")]
    PayloadRefused(BlobError),
    /// The blob store could not be written.
    #[error(transparent)]
    BlobStorage(BlobError),
    #[error("{0}")]
    InvalidReference(flotte_proto::image::ImageError),
    #[error("no image {0}")]
    NoSuchImage(ImageReference),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<BlobError> for ImageError {
    fn from(error: BlobError) -> Self {
        match error {
            BlobError::Io { .. } | BlobError::Database(_) => ImageError::BlobStorage(error),
            _ => ImageError::PayloadRefused(error),
        }
    }
}

/// An image with the number of machines that last reported running it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInUse {
    pub record: ImageRecord,
    pub machines: u32,
}

/// The first message of a push: the signed manifest and the first bytes of
/// the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedManifest {
    pub manifest_json: Vec<u8>,
    pub signature: Vec<u8>,
    pub first_payload: Vec<u8>,
}

/// Where a verified push goes next.
pub enum PushStart {
    /// The same image (name, version and payload) is published already.
    AlreadyPublished(ImageInUse),
    /// The payload is to be uploaded: hand it every further chunk.
    Upload(Box<ImageUpload>),
}

/// A verified image whose payload is being written.
pub struct ImageUpload {
    manifest: Manifest,
    manifest_json: Vec<u8>,
    signature: Vec<u8>,
    writer: Box<dyn BlobWriter>,
}

/// The release keys the server trusts now.
pub async fn trusted_release_keys(
    state: &ServerState,
) -> Result<Vec<ReleasePublicKey>, ImageError> {
    Ok(state
        .store
        .release_keys()
        .await?
        .iter()
        .filter_map(|record| parse_release_key(&record.public_key_base64).ok())
        .collect())
}

/// Machines currently running `digest`, as last reported.
fn machines_running(state: &ServerState, digest: &str) -> u32 {
    let count = state
        .health
        .snapshot()
        .values()
        .filter(|machine| {
            machine
                .last_report
                .as_ref()
                .and_then(|report| report.current_image())
                .is_some_and(|current| current.digest == digest)
        })
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

fn in_use(state: &ServerState, record: ImageRecord) -> ImageInUse {
    ImageInUse {
        machines: machines_running(state, &record.digest),
        record,
    }
}

/// Verifies a push's manifest and, unless the same image is published
/// already, starts writing its payload with the first bytes.
pub async fn begin_push(
    state: &ServerState,
    pushed: PushedManifest,
) -> Result<PushStart, ImageError> {
    let trusted = trusted_release_keys(state).await?;
    let manifest = verify_manifest(&pushed.manifest_json, &pushed.signature, &trusted)
        .map_err(ImageError::Refused)?;
    if let Some(existing) = state.store.image(&manifest.name, &manifest.version).await? {
        return if existing.digest == manifest.payload_sha256 {
            // Pushing the same image again is harmless.
            Ok(PushStart::AlreadyPublished(in_use(state, existing)))
        } else {
            Err(ImageError::OtherPayloadExists {
                reference: manifest.reference(),
                existing_digest: existing.digest,
            })
        };
    }
    let writer = state.blobs.begin(manifest.payload_size).await?;
    let mut upload = ImageUpload {
        manifest,
        manifest_json: pushed.manifest_json,
        signature: pushed.signature,
        writer,
    };
    upload.write(&pushed.first_payload).await?;
    Ok(PushStart::Upload(Box::new(upload)))
}

impl ImageUpload {
    /// Appends a chunk of the payload. After an error the upload is
    /// abandoned by the caller ([`ImageUpload::abandon`]).
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ImageError> {
        Ok(self.writer.write(chunk).await?)
    }

    /// Drops what was written (the push failed or was cut off).
    pub async fn abandon(self) {
        self.writer.abandon().await;
    }

    /// Checks the payload against the manifest, places it and records the
    /// image, pushed by `pushed_by`.
    pub async fn finish(
        self,
        state: &ServerState,
        pushed_by: &str,
    ) -> Result<ImageRecord, ImageError> {
        let manifest = self.manifest;
        self.writer.finish(&manifest.payload_sha256).await?;
        let record = ImageRecord {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            digest: manifest.payload_sha256.clone(),
            size: manifest.payload_size,
            manifest_json: self.manifest_json,
            signature: self.signature,
            signing_key: manifest.signing_key.clone(),
            pushed_at: state.clock.now_unix(),
            pushed_by: pushed_by.to_owned(),
        };
        if !state.store.insert_image(&record).await? {
            return Err(ImageError::PushedConcurrently(manifest.reference()));
        }
        state
            .image_ages
            .record(&record.name, &record.version, &record.manifest_json);
        tracing::info!(image = %manifest.reference(), digest = %record.digest, size = record.size, "image pushed");
        Ok(record)
    }
}

/// Every image (or every version of `name`) with the machines running it.
pub async fn images(
    state: &ServerState,
    name: Option<&str>,
) -> Result<Vec<ImageInUse>, ImageError> {
    let records = state.store.images(name).await?;
    Ok(records
        .into_iter()
        .map(|record| in_use(state, record))
        .collect())
}

/// The image `reference` (`name@version`) with the machines running it.
pub async fn image(state: &ServerState, reference: &str) -> Result<ImageInUse, ImageError> {
    let wanted: ImageReference = reference.parse().map_err(ImageError::InvalidReference)?;
    let record = state
        .store
        .image(&wanted.name, &wanted.version.to_string())
        .await?
        .ok_or(ImageError::NoSuchImage(wanted))?;
    Ok(in_use(state, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_that_does_not_match_is_refused_and_blob_io_is_a_storage_failure() {
        let mismatch = ImageError::from(BlobError::SizeMismatch {
            expected: 4,
            actual: 3,
        });
        assert!(matches!(mismatch, ImageError::PayloadRefused(_)));
        assert_eq!(
            mismatch.to_string(),
            "payload refused: the payload is 3 bytes, its manifest declares 4"
        );
        let io = ImageError::from(BlobError::Io {
            path: "/blobs/x".into(),
            source: std::io::Error::other("disk full"),
        });
        assert!(matches!(io, ImageError::BlobStorage(_)));
        assert_eq!(io.to_string(), "blob I/O error on /blobs/x: disk full");
    }
}
