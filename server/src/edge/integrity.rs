//! `flotte.v1.ImageIntegrity` (admin) and the agent's side of image
//! verification on the session: the command sent to an agent, and its
//! `ImageVerification` answer converted into the store's record — bounded
//! on the way in (the agent's own 100 differences, short texts) before it
//! costs a store write.

use std::sync::Arc;
use std::time::Duration;

use flotte_proto::v1::image_integrity_server::ImageIntegrity;
use flotte_proto::v1::{
    ImageAction, ImageCommand, ImageDifference, ImageRef, ImageVerification,
    ListVerificationsRequest, ListVerificationsResponse, MachineVerification, RestoreImageRequest,
    RestoreImageResponse, VerificationTarget, VerifyImagesRequest, VerifyImagesResponse,
};
use serde_json::json;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::edge::guard::admit;
use crate::edge::health_report::{bounded_text, image_from_proto};
use crate::services::integrity::{self, IntegrityError};
use crate::store::integrity::{
    DifferenceCounts, DifferenceRecord, ImageVerificationRecord, VerificationDetails,
};
use crate::store::UnixSeconds;
use crate::ServerState;
use flotte_common::roles::AdminRpc;

/// A session's verifications reach the store at most this often.
pub const MIN_VERIFICATION_SPACING: Duration = Duration::from_secs(1);
/// Differences kept per verification (what the agent sends at most).
pub const MAX_KEPT_DIFFERENCES: usize = 100;
/// Paths, errors, messages.
const MAX_TEXT_BYTES: usize = 1024;
/// A difference's detail.
const MAX_DETAIL_BYTES: usize = 256;
/// Targets, selectors and ids quoted in audit entries and errors.
const MAX_ARGUMENT_BYTES: usize = 256;
/// Machine ids a listing may name.
const MAX_LISTED_IDS: usize = 10_000;

pub fn image_command_to_proto(request_id: String, restore: bool) -> ImageCommand {
    ImageCommand {
        request_id,
        action: if restore {
            ImageAction::Restore
        } else {
            ImageAction::Verify
        } as i32,
    }
}

/// The store's record of an agent's verification, bounded.
pub fn verification_from_proto(
    machine_id: Uuid,
    verification: ImageVerification,
    received_at: UnixSeconds,
) -> ImageVerificationRecord {
    let image = image_from_proto(verification.image.unwrap_or_default());
    let text = |text: String| bounded_text(text, MAX_TEXT_BYTES);
    let result = match verification.result.as_str() {
        "clean" | "drift" | "error" => verification.result,
        _ => "error".to_owned(),
    };
    ImageVerificationRecord {
        machine_id,
        received_at,
        request_id: bounded_text(verification.request_id, 64),
        result,
        started_at: verification.started_at,
        duration_ms: verification.duration_ms,
        bytes_read: verification.bytes_read,
        details: VerificationDetails {
            image_name: image.name,
            image_version: image.version,
            image_digest: image.digest,
            entries_checked: verification.entries_checked,
            error: text(verification.error),
            counts: DifferenceCounts {
                changed: verification.changed,
                added: verification.added,
                removed: verification.removed,
                mode_changed: verification.mode_changed,
                link_retargeted: verification.link_retargeted,
            },
            differences: verification
                .differences
                .into_iter()
                .take(MAX_KEPT_DIFFERENCES)
                .map(|difference| DifferenceRecord {
                    path: text(difference.path),
                    kind: bounded_text(difference.kind, 16),
                    detail: bounded_text(difference.detail, MAX_DETAIL_BYTES),
                })
                .collect(),
            kept_tree: text(verification.kept_tree),
            restore_message: text(verification.restore_message),
        },
    }
}

fn verification_to_proto(record: &ImageVerificationRecord) -> ImageVerification {
    let details = &record.details;
    ImageVerification {
        request_id: record.request_id.clone(),
        image: Some(ImageRef {
            name: details.image_name.clone(),
            version: details.image_version.clone(),
            digest: details.image_digest.clone(),
        }),
        started_at: record.started_at,
        duration_ms: record.duration_ms,
        bytes_read: record.bytes_read,
        entries_checked: details.entries_checked,
        result: record.result.clone(),
        error: details.error.clone(),
        changed: details.counts.changed,
        added: details.counts.added,
        removed: details.counts.removed,
        mode_changed: details.counts.mode_changed,
        link_retargeted: details.counts.link_retargeted,
        differences: details
            .differences
            .iter()
            .map(|difference| ImageDifference {
                path: difference.path.clone(),
                kind: difference.kind.clone(),
                detail: difference.detail.clone(),
            })
            .collect(),
        kept_tree: details.kept_tree.clone(),
        restore_message: details.restore_message.clone(),
    }
}

/// Stores an agent's verification; a failure is logged (the agent sends
/// its latest again on the next connect).
pub async fn record_verification(
    state: &ServerState,
    machine_id: Uuid,
    verification: ImageVerification,
    now: UnixSeconds,
) {
    let record = verification_from_proto(machine_id, verification, now);
    tracing::info!(machine = %machine_id, result = %record.result, differences = record.details.counts.total(), request = %record.request_id, "image verification received");
    if let Err(error) = integrity::record(state, &record).await {
        tracing::warn!(machine = %machine_id, %error, "cannot store an image verification");
    }
}

impl From<IntegrityError> for Status {
    fn from(error: IntegrityError) -> Self {
        match error {
            IntegrityError::Machine(error) => error.into(),
            IntegrityError::BadSelector { .. } => Status::invalid_argument(error.to_string()),
            IntegrityError::NoneSelected(_) => Status::not_found(error.to_string()),
            IntegrityError::NotConnected(_) => Status::failed_precondition(error.to_string()),
            IntegrityError::Store(error) => error.into(),
        }
    }
}

fn argument(text: &str) -> String {
    bounded_text(text.to_owned(), MAX_ARGUMENT_BYTES)
}

#[derive(Debug, Clone)]
pub struct IntegrityApi {
    state: Arc<ServerState>,
}

impl IntegrityApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        IntegrityApi { state }
    }
}

#[tonic::async_trait]
impl ImageIntegrity for IntegrityApi {
    async fn verify_images(
        &self,
        request: Request<VerifyImagesRequest>,
    ) -> Result<Response<VerifyImagesResponse>, Status> {
        let arguments = json!({ "target": argument(&request.get_ref().target) });
        let call = admit(&self.state, &request, AdminRpc::VerifyImages, arguments).await?;
        let state = Arc::clone(&self.state);
        let target = request.into_inner().target;
        call.run(
            async move {
                let (request_id, asked) = integrity::ask_verification(&state, &target).await?;
                Ok(VerifyImagesResponse {
                    request_id,
                    machines: asked
                        .into_iter()
                        .map(|machine| VerificationTarget {
                            machine_id: machine.machine_id.to_string(),
                            hostname: machine.hostname,
                            sent: machine.sent,
                        })
                        .collect(),
                })
            },
            |response| {
                format!(
                    "request {} to {} machines",
                    response.request_id,
                    response.machines.len()
                )
            },
        )
        .await
    }

    async fn list_verifications(
        &self,
        request: Request<ListVerificationsRequest>,
    ) -> Result<Response<ListVerificationsResponse>, Status> {
        admit(
            &self.state,
            &request,
            AdminRpc::ListVerifications,
            json!({}),
        )
        .await?;
        let request = request.into_inner();
        if request.machine_ids.len() > MAX_LISTED_IDS {
            return Err(Status::invalid_argument(format!(
                "{} machine ids named; at most {MAX_LISTED_IDS}",
                request.machine_ids.len()
            )));
        }
        let listed = integrity::list(
            &self.state,
            &request.selector,
            &request.machine_ids,
            request.drift_only,
        )
        .await?;
        Ok(Response::new(ListVerificationsResponse {
            verifications: listed
                .iter()
                .map(|(record, hostname)| MachineVerification {
                    machine_id: record.machine_id.to_string(),
                    hostname: hostname.clone(),
                    received_at: record.received_at,
                    verification: Some(verification_to_proto(record)),
                })
                .collect(),
        }))
    }

    async fn restore_image(
        &self,
        request: Request<RestoreImageRequest>,
    ) -> Result<Response<RestoreImageResponse>, Status> {
        let arguments = json!({ "machine": argument(&request.get_ref().machine) });
        let call = admit(&self.state, &request, AdminRpc::RestoreImage, arguments).await?;
        let state = Arc::clone(&self.state);
        let key = request.into_inner().machine;
        call.run(
            async move {
                let (machine, request_id) = integrity::ask_restore(&state, &key).await?;
                Ok(RestoreImageResponse {
                    machine_id: machine.id.to_string(),
                    request_id,
                })
            },
            |response| format!("request {}", response.request_id),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verification_is_bounded_on_the_way_in_and_survives_the_way_out() {
        let machine_id = Uuid::new_v4();
        let sent = ImageVerification {
            request_id: "r".repeat(500),
            image: Some(ImageRef {
                name: "app".into(),
                version: "1.0.0".into(),
                digest: "d".repeat(64),
            }),
            started_at: 10,
            duration_ms: 20,
            bytes_read: 30,
            entries_checked: 40,
            result: "drift".into(),
            error: String::new(),
            changed: 500,
            added: 1,
            removed: 2,
            mode_changed: 3,
            link_retargeted: 4,
            differences: (0..500)
                .map(|index| ImageDifference {
                    path: format!("{index}/{}", "p".repeat(5000)),
                    kind: "changed".into(),
                    detail: "x".repeat(5000),
                })
                .collect(),
            kept_tree: String::new(),
            restore_message: String::new(),
        };
        let record = verification_from_proto(machine_id, sent.clone(), 99);
        assert_eq!(record.details.differences.len(), MAX_KEPT_DIFFERENCES);
        assert!(record
            .details
            .differences
            .iter()
            .all(|difference| difference.path.len() <= MAX_TEXT_BYTES
                && difference.detail.len() <= MAX_DETAIL_BYTES));
        assert_eq!(record.request_id.len(), 64);
        assert_eq!(record.details.counts.total(), 510);
        let shown = verification_to_proto(&record);
        assert_eq!(shown.changed, 500);
        assert_eq!(shown.differences.len(), MAX_KEPT_DIFFERENCES);
        assert_eq!(shown.image, sent.image);

        let odd = ImageVerification {
            result: "fine, trust me".into(),
            ..ImageVerification::default()
        };
        assert_eq!(verification_from_proto(machine_id, odd, 1).result, "error");
    }
}
