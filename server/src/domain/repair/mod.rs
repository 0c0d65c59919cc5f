//! Repair decisions: which unhealthy machines to remediate and when the
//! breaker holds (`remediation`), the remediation rules as configured
//! (`settings`), and what losing a zone would cost (`dr`).

pub mod dr;
pub mod remediation;
pub mod settings;
