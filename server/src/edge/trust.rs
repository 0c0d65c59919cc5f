//! `flotte.v1.ReleaseKeys` (the ed25519 keys trusted to sign images) and
//! `flotte.v1.Audit` (reading the hash-chained audit log; verifying it is
//! done by the reader, see `audit::verify_chain`).

use std::sync::Arc;

use flotte_proto::v1::audit_server::Audit;
use flotte_proto::v1::release_keys_server::ReleaseKeys;
use flotte_proto::v1::AuditCheckpoint as ProtoAuditCheckpoint;
use flotte_proto::v1::{
    AddReleaseKeyRequest, AuditEntry, ListAuditRequest, ListAuditResponse, ListReleaseKeysRequest,
    ListReleaseKeysResponse, ReleaseKey, RemoveReleaseKeyRequest,
};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::edge::guard::admit;
use crate::services;
use crate::store::ReleaseKeyRecord;
use crate::ServerState;
use flotte_common::audit::{AuditFilter, AuditRecord};
use flotte_common::roles::AdminRpc;
use flotte_proto::release_keys::parse_release_key;

/// Release key names are labels for people; keep them short.
const MAX_KEY_NAME_LENGTH: usize = 100;
/// Characters of the key id used as a default name.
const DEFAULT_NAME_ID_PREFIX: usize = 12;

#[derive(Debug, Clone)]
pub struct TrustApi {
    state: Arc<ServerState>,
}

impl TrustApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        TrustApi { state }
    }
}

fn release_key(record: &ReleaseKeyRecord) -> ReleaseKey {
    // Stored as validated base64, which the parser reads back.
    let openssh = parse_release_key(&record.public_key_base64)
        .map(|key| key.openssh_line())
        .unwrap_or_default();
    ReleaseKey {
        id: record.id.clone(),
        name: record.name.clone(),
        public_key_base64: record.public_key_base64.clone(),
        openssh,
        added_at: record.added_at,
        added_by: record.added_by.clone(),
    }
}

fn audit_entry(record: AuditRecord) -> AuditEntry {
    let event = record.event;
    AuditEntry {
        seq: record.seq,
        at: event.at,
        actor: event.actor,
        role: event.role,
        action: event.action,
        arguments_json: event.arguments_json,
        result: event.result,
        previous_hash: record.previous_hash,
        hash: record.hash,
    }
}

async fn add_key(
    state: &ServerState,
    request: AddReleaseKeyRequest,
    added_by: &str,
) -> Result<ReleaseKey, Status> {
    let key = parse_release_key(&request.key_text)
        .map_err(|error| Status::invalid_argument(error.to_string()))?;
    let id = key.id();
    let name = match (request.name.trim(), key.comment.trim()) {
        ("", "") => id[..DEFAULT_NAME_ID_PREFIX].to_owned(),
        ("", comment) => comment.to_owned(),
        (name, _) => name.to_owned(),
    };
    if name.chars().count() > MAX_KEY_NAME_LENGTH || name.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "key name must be at most {MAX_KEY_NAME_LENGTH} printable characters"
        )));
    }
    let record = ReleaseKeyRecord {
        id,
        name,
        public_key_base64: key.base64(),
        added_at: state.clock.now_unix(),
        added_by: added_by.to_owned(),
    };
    state.store.insert_release_key(&record).await?;
    tracing::info!(key = %record.id, name = %record.name, %added_by, "release key trusted");
    Ok(release_key(&record))
}

/// Finds a trusted key by id, unique id prefix or name.
fn find_key<'a>(
    keys: &'a [ReleaseKeyRecord],
    wanted: &str,
) -> Result<&'a ReleaseKeyRecord, Status> {
    let matches: Vec<_> = keys
        .iter()
        .filter(|key| key.name == wanted || (!wanted.is_empty() && key.id.starts_with(wanted)))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(Status::not_found(format!(
            "no trusted release key matches {wanted:?} (id, id prefix or name)"
        ))),
        many => Err(Status::invalid_argument(format!(
            "{wanted:?} matches {} keys; use more of the id",
            many.len()
        ))),
    }
}

async fn remove_key(state: &ServerState, wanted: &str) -> Result<ReleaseKey, Status> {
    let keys = state.store.release_keys().await?;
    let id = find_key(&keys, wanted)?.id.clone();
    let removed = state
        .store
        .remove_release_key(&id)
        .await?
        .ok_or_else(|| Status::not_found(format!("release key {id} was removed meanwhile")))?;
    tracing::info!(key = %removed.id, name = %removed.name, "release key no longer trusted");
    Ok(release_key(&removed))
}

#[tonic::async_trait]
impl ReleaseKeys for TrustApi {
    async fn add_release_key(
        &self,
        request: Request<AddReleaseKeyRequest>,
    ) -> Result<Response<ReleaseKey>, Status> {
        // The key text is public, but the audit records what was trusted by
        // its id (in the result), not the file as sent.
        let arguments = json!({ "name": request.get_ref().name });
        let call = admit(&self.state, &request, AdminRpc::AddReleaseKey, arguments).await?;
        let state = Arc::clone(&self.state);
        let added_by = call.actor().to_owned();
        let request = request.into_inner();
        call.run(
            async move { add_key(&state, request, &added_by).await },
            |key| format!("key {} ({})", key.id, key.name),
        )
        .await
    }

    async fn remove_release_key(
        &self,
        request: Request<RemoveReleaseKeyRequest>,
    ) -> Result<Response<ReleaseKey>, Status> {
        let wanted = request.get_ref().key.clone();
        let call = admit(
            &self.state,
            &request,
            AdminRpc::RemoveReleaseKey,
            json!({ "key": wanted }),
        )
        .await?;
        let state = Arc::clone(&self.state);
        call.run(async move { remove_key(&state, &wanted).await }, |key| {
            format!("key {} ({})", key.id, key.name)
        })
        .await
    }

    async fn list_release_keys(
        &self,
        request: Request<ListReleaseKeysRequest>,
    ) -> Result<Response<ListReleaseKeysResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ListReleaseKeys, json!({})).await?;
        let keys = self.state.store.release_keys().await?;
        Ok(Response::new(ListReleaseKeysResponse {
            keys: keys.iter().map(release_key).collect(),
        }))
    }
}

#[tonic::async_trait]
impl Audit for TrustApi {
    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        admit(&self.state, &request, AdminRpc::ListAudit, json!({})).await?;
        let request = request.into_inner();
        let filter = AuditFilter {
            since: (request.since != 0).then_some(request.since),
            actor: (!request.actor.is_empty()).then_some(request.actor),
            after_seq: Some(request.after_seq),
            limit: (request.limit != 0).then_some(request.limit),
        };
        let page = services::audit::audit_page(&self.state, filter).await?;
        Ok(Response::new(ListAuditResponse {
            entries: page.entries.into_iter().map(audit_entry).collect(),
            checkpoints: page
                .checkpoints
                .into_iter()
                .map(|checkpoint| ProtoAuditCheckpoint {
                    seq: checkpoint.seq,
                    head_hash: checkpoint.head_hash,
                    at: checkpoint.at,
                    key_id: checkpoint.key_id,
                    signature: checkpoint.signature,
                })
                .collect(),
            more: page.more,
            audit_public_key: page.audit_public_key,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, name: &str) -> ReleaseKeyRecord {
        ReleaseKeyRecord {
            id: id.into(),
            name: name.into(),
            public_key_base64: String::new(),
            added_at: 0,
            added_by: "admin".into(),
        }
    }

    #[test]
    fn keys_are_found_by_name_or_unique_id_prefix() {
        let keys = [key("aabb01", "ci"), key("aabb02", "laptop")];
        assert_eq!(find_key(&keys, "laptop").unwrap().id, "aabb02");
        assert_eq!(find_key(&keys, "aabb01").unwrap().name, "ci");
        assert_eq!(
            find_key(&keys, "aabb").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            find_key(&keys, "zz").unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            find_key(&keys, "").unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
}
