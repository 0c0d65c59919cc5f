//! Repair decisions: which unhealthy machines to remediate and when the
//! breaker holds (`remediation`), the remediation rules as configured
//! (`settings`), and what losing a zone would cost (`dr`).

pub mod dr;
pub mod remediation;
pub mod settings;

use uuid::Uuid;

use crate::store::repair::QuarantineRecord;

/// A fresh quarantine of `machine_id` (its id is what the agent collects a
/// bundle for, once).
pub fn new_quarantine(machine_id: Uuid, reason: String, by: &str, now: i64) -> QuarantineRecord {
    QuarantineRecord {
        machine_id,
        id: Uuid::new_v4().simple().to_string(),
        reason,
        since: now,
        by: by.to_owned(),
    }
}
