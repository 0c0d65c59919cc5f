//! Reading the audit log page by page, with the signed checkpoints a reader
//! needs to verify each page (`flotte_common::audit_checkpoints`).

use flotte_common::audit::{AuditFilter, AuditRecord};
use flotte_common::audit_checkpoints::AuditCheckpoint;

use crate::store::StoreError;
use crate::ServerState;

/// Entries per page at most: a page of maximal entries (4 KiB arguments,
/// 1 KiB results, bounded by the admin gate) stays far below the 4 MiB
/// message limit.
pub const AUDIT_PAGE_ENTRIES: u32 = 500;

/// One page of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    pub entries: Vec<AuditRecord>,
    pub checkpoints: Vec<AuditCheckpoint>,
    pub more: bool,
    pub audit_public_key: String,
}

/// The entries matching `filter` after `filter.after_seq`, at most a page,
/// and the checkpoints of that range (every later one too on the last page).
pub async fn audit_page(
    state: &ServerState,
    mut filter: AuditFilter,
) -> Result<AuditPage, StoreError> {
    let limit = filter
        .limit
        .filter(|limit| (1..=AUDIT_PAGE_ENTRIES).contains(limit))
        .unwrap_or(AUDIT_PAGE_ENTRIES);
    // One more than the page tells whether another page follows.
    filter.limit = Some(limit + 1);
    let after_seq = filter.after_seq.unwrap_or(0);
    let mut entries = state.store.audit_entries(&filter).await?;
    let more = entries.len() > limit as usize;
    entries.truncate(limit as usize);
    let up_to = if more {
        entries.last().map(|entry| entry.seq)
    } else {
        None
    };
    let checkpoints = state.store.audit_checkpoints(after_seq, up_to).await?;
    Ok(AuditPage {
        entries,
        checkpoints,
        more,
        audit_public_key: state.audit_key.public_key_hex.clone(),
    })
}
