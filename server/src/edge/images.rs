//! `flotte.v1.Images`: push (signature checked against the trusted release
//! keys before a payload byte is accepted), list and show.

use std::sync::Arc;

use flotte_proto::image::{verify_manifest, ImageReference, Manifest};
use flotte_proto::release_keys::{parse_release_key, ReleasePublicKey};
use flotte_proto::v1::images_server::Images;
use flotte_proto::v1::{
    GetImageRequest, ImageInfo, ImageRef, ListImagesRequest, ListImagesResponse, PushImageChunk,
};
use serde_json::json;
use tonic::{Request, Response, Status, Streaming};

use crate::edge::guard::admit;
use crate::images::{BlobError, BlobStore};
use crate::store::ImageRecord;
use crate::ServerState;
use flotte_common::roles::AdminRpc;

#[derive(Debug, Clone)]
pub struct ImagesApi {
    state: Arc<ServerState>,
}

impl ImagesApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        ImagesApi { state }
    }
}

/// The release keys the server trusts now.
pub async fn trusted_release_keys(state: &ServerState) -> Result<Vec<ReleasePublicKey>, Status> {
    Ok(state
        .store
        .release_keys()
        .await?
        .iter()
        .filter_map(|record| parse_release_key(&record.public_key_base64).ok())
        .collect())
}

fn created_at(manifest_json: &[u8]) -> i64 {
    serde_json::from_slice::<Manifest>(manifest_json)
        .ok()
        .and_then(|manifest| humantime::parse_rfc3339(&manifest.created_at).ok())
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |duration| i64::try_from(duration.as_secs()).unwrap_or(0))
}

pub fn image_info(record: &ImageRecord, machines: u32) -> ImageInfo {
    ImageInfo {
        image: Some(ImageRef {
            name: record.name.clone(),
            version: record.version.clone(),
            digest: record.digest.clone(),
        }),
        size: record.size,
        manifest_json: String::from_utf8_lossy(&record.manifest_json).into_owned(),
        signing_key: record.signing_key.clone(),
        pushed_at: record.pushed_at,
        pushed_by: record.pushed_by.clone(),
        created_at: created_at(&record.manifest_json),
        machines,
    }
}

fn blob_status(error: BlobError) -> Status {
    match error {
        BlobError::Io { .. } => Status::internal(error.to_string()),
        _ => Status::invalid_argument(format!("payload refused: {error}")),
    }
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

#[tonic::async_trait]
impl Images for ImagesApi {
    async fn push_image(
        &self,
        mut request: Request<Streaming<PushImageChunk>>,
    ) -> Result<Response<ImageInfo>, Status> {
        // The caller's role is checked before a byte of the push is read (a
        // refusal is audited without the image, which was not read); the
        // call is admitted again below with the image for the audit entry.
        admit(
            &self.state,
            &request,
            AdminRpc::PushImage,
            json!({ "image": null }),
        )
        .await?;
        let first = request.get_mut().message().await?.ok_or_else(|| {
            Status::invalid_argument("empty push: the first message must carry the manifest")
        })?;
        let reference = serde_json::from_slice::<Manifest>(&first.manifest_json)
            .map(|manifest| manifest.reference())
            .unwrap_or_default();
        let call = admit(
            &self.state,
            &request,
            AdminRpc::PushImage,
            json!({ "image": reference }),
        )
        .await?;
        let state = Arc::clone(&self.state);
        let pushed_by = call.actor().to_owned();
        let mut stream = request.into_inner();
        call.run(
            async move {
                let trusted = trusted_release_keys(&state).await?;
                let manifest = verify_manifest(&first.manifest_json, &first.signature, &trusted)
                    .map_err(|error| Status::permission_denied(format!("image refused: {error}")))?;
                if let Some(existing) = state.store.image(&manifest.name, &manifest.version).await? {
                    return if existing.digest == manifest.payload_sha256 {
                        // Pushing the same image again is harmless.
                        Ok(image_info(&existing, machines_running(&state, &existing.digest)))
                    } else {
                        Err(Status::already_exists(format!(
                            "{} already exists with another payload ({}); publish a new version",
                            manifest.reference(),
                            existing.digest
                        )))
                    };
                }
                let blobs = BlobStore::new(&state.config.data_dir);
                let mut writer = blobs.begin(manifest.payload_size).await.map_err(blob_status)?;
                if let Err(error) = writer.write(&first.payload).await {
                    writer.abandon().await;
                    return Err(blob_status(error));
                }
                loop {
                    match stream.message().await {
                        Ok(Some(chunk)) => {
                            if let Err(error) = writer.write(&chunk.payload).await {
                                writer.abandon().await;
                                return Err(blob_status(error));
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            writer.abandon().await;
                            return Err(status);
                        }
                    }
                }
                writer
                    .finish(&blobs, &manifest.payload_sha256)
                    .await
                    .map_err(blob_status)?;
                let record = ImageRecord {
                    name: manifest.name.clone(),
                    version: manifest.version.clone(),
                    digest: manifest.payload_sha256.clone(),
                    size: manifest.payload_size,
                    manifest_json: first.manifest_json,
                    signature: first.signature,
                    signing_key: manifest.signing_key.clone(),
                    pushed_at: state.clock.now_unix(),
                    pushed_by,
                };
                if !state.store.insert_image(&record).await? {
                    return Err(Status::already_exists(format!(
                        "{} was pushed concurrently",
                        manifest.reference()
                    )));
                }
                tracing::info!(image = %manifest.reference(), digest = %record.digest, size = record.size, "image pushed");
                Ok(image_info(&record, 0))
            },
            |info: &ImageInfo| {
                info.image
                    .as_ref()
                    .map(|image| format!("{}@{} {}", image.name, image.version, image.digest))
                    .unwrap_or_default()
            },
        )
        .await
    }

    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let call = admit(&self.state, &request, AdminRpc::ListImages, json!({})).await?;
        let state = Arc::clone(&self.state);
        let name = request.into_inner().name;
        call.run(
            async move {
                let records = state
                    .store
                    .images((!name.is_empty()).then_some(name.as_str()))
                    .await?;
                Ok(ListImagesResponse {
                    images: records
                        .iter()
                        .map(|record| image_info(record, machines_running(&state, &record.digest)))
                        .collect(),
                })
            },
            |_| String::new(),
        )
        .await
    }

    async fn get_image(
        &self,
        request: Request<GetImageRequest>,
    ) -> Result<Response<ImageInfo>, Status> {
        let call = admit(&self.state, &request, AdminRpc::GetImage, json!({})).await?;
        let state = Arc::clone(&self.state);
        let reference = request.into_inner().reference;
        call.run(
            async move {
                let wanted: ImageReference =
                    reference
                        .parse()
                        .map_err(|error: flotte_proto::image::ImageError| {
                            Status::invalid_argument(error.to_string())
                        })?;
                let record = state
                    .store
                    .image(&wanted.name, &wanted.version.to_string())
                    .await?
                    .ok_or_else(|| Status::not_found(format!("no image {wanted}")))?;
                Ok(image_info(
                    &record,
                    machines_running(&state, &record.digest),
                ))
            },
            |_| String::new(),
        )
        .await
    }
}
