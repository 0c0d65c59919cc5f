//! `flotte.v1.Images`: push (signature checked against the trusted release
//! keys before a payload byte is accepted), list and show.

use std::sync::Arc;

use flotte_proto::image::Manifest;
use flotte_proto::v1::images_server::Images;
use flotte_proto::v1::{
    GetImageRequest, ImageInfo, ImageRef, ListImagesRequest, ListImagesResponse, PushImageChunk,
};
use serde_json::json;
use tonic::{Request, Response, Status, Streaming};

use crate::edge::guard::admit;
use crate::services::images::{self, ImageError, ImageInUse, PushStart, PushedManifest};
use crate::store::ImageRecord;
use crate::ServerState;
use flotte_common::roles::AdminRpc;

impl From<ImageError> for Status {
    fn from(error: ImageError) -> Self {
        match error {
            ImageError::Refused(_) => Status::permission_denied(error.to_string()),
            ImageError::OtherPayloadExists { .. } | ImageError::PushedConcurrently(_) => {
                Status::already_exists(error.to_string())
            }
            ImageError::PayloadRefused(_) | ImageError::InvalidReference(_) => {
                Status::invalid_argument(error.to_string())
            }
            ImageError::BlobStorage(ref blob) if blob.is_disk_full() => {
                crate::edge::disk_full_status(&error)
            }
            ImageError::BlobStorage(_) => Status::internal(error.to_string()),
            ImageError::NoSuchImage(_) => Status::not_found(error.to_string()),
            ImageError::Store(error) => error.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImagesApi {
    state: Arc<ServerState>,
}

impl ImagesApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        ImagesApi { state }
    }
}

fn image_info(record: &ImageRecord, machines: u32) -> ImageInfo {
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
        created_at: crate::domain::image_age::manifest_created_at(&record.manifest_json),
        machines,
    }
}

fn image_in_use_info(image: &ImageInUse) -> ImageInfo {
    image_info(&image.record, image.machines)
}

/// Reads the rest of a push into `upload` and finishes it; the upload is
/// abandoned on any error, the stream's own included.
async fn upload_rest(
    state: &ServerState,
    mut upload: Box<images::ImageUpload>,
    stream: &mut Streaming<PushImageChunk>,
    pushed_by: &str,
) -> Result<ImageRecord, Status> {
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                if let Err(error) = upload.write(&chunk.payload).await {
                    upload.abandon().await;
                    return Err(error.into());
                }
            }
            Ok(None) => break,
            Err(status) => {
                upload.abandon().await;
                return Err(status);
            }
        }
    }
    Ok(upload.finish(state, pushed_by).await?)
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
                let pushed = PushedManifest {
                    manifest_json: first.manifest_json,
                    signature: first.signature,
                    first_payload: first.payload,
                };
                match images::begin_push(&state, pushed).await? {
                    PushStart::AlreadyPublished(existing) => Ok(image_in_use_info(&existing)),
                    PushStart::Upload(upload) => {
                        let record = upload_rest(&state, upload, &mut stream, &pushed_by).await?;
                        Ok(image_info(&record, 0))
                    }
                }
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
                let found =
                    images::images(&state, (!name.is_empty()).then_some(name.as_str())).await?;
                Ok(ListImagesResponse {
                    images: found.iter().map(image_in_use_info).collect(),
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
                let image = images::image(&state, &reference).await?;
                Ok(image_in_use_info(&image))
            },
            |_| String::new(),
        )
        .await
    }
}
