//! The image-integrity part of the store, behind its own trait: the last
//! verification each machine reported (one row per machine, replaced by the
//! next one). A write happens once per verification an agent finishes,
//! never per report.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{StoreError, UnixSeconds};

/// How many of each kind of difference a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DifferenceCounts {
    pub changed: u64,
    pub added: u64,
    pub removed: u64,
    pub mode_changed: u64,
    pub link_retargeted: u64,
}

impl DifferenceCounts {
    pub fn total(&self) -> u64 {
        self.changed
            .saturating_add(self.added)
            .saturating_add(self.removed)
            .saturating_add(self.mode_changed)
            .saturating_add(self.link_retargeted)
    }
}

/// One path that differs from the image's index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DifferenceRecord {
    pub path: String,
    /// "changed", "added", "removed", "mode" or "link".
    pub kind: String,
    pub detail: String,
}

/// What is kept of a verification besides the columns listings use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationDetails {
    pub image_name: String,
    pub image_version: String,
    pub image_digest: String,
    pub entries_checked: u64,
    pub error: String,
    pub counts: DifferenceCounts,
    /// The first differences, as bounded by the session edge.
    pub differences: Vec<DifferenceRecord>,
    pub kept_tree: String,
    pub restore_message: String,
}

/// A machine's last image verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageVerificationRecord {
    pub machine_id: Uuid,
    /// Server clock.
    pub received_at: UnixSeconds,
    /// The request it answers; empty for a periodic verification.
    pub request_id: String,
    /// "clean", "drift" or "error".
    pub result: String,
    /// Agent clock.
    pub started_at: UnixSeconds,
    pub duration_ms: u64,
    pub bytes_read: u64,
    pub details: VerificationDetails,
}

#[async_trait::async_trait]
pub trait IntegrityStore: Send + Sync + 'static {
    /// Replaces the machine's last verification; `false` (nothing written)
    /// if no such machine is enrolled.
    async fn record_verification(
        &self,
        verification: &ImageVerificationRecord,
    ) -> Result<bool, StoreError>;
    /// Every machine's last verification, by machine id.
    async fn verifications(&self) -> Result<Vec<ImageVerificationRecord>, StoreError>;
}
