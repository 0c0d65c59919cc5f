//! The access page: who can reach what (granted keys per machine and login,
//! with expiry), the grants, keys found that Flotte did not put there
//! (drift), and how far the latest policy version has propagated.

use std::sync::Arc;

use flotte_proto::v1::access_client::AccessClient;
use flotte_proto::v1::{
    AccessReportEntry, AccessReportRequest, AccessStatusRequest, ListGrantsRequest,
};
use hyper::Response;
use maud::html;

use super::machine::keys_table;
use super::{layout, time, Section};
use crate::ui::http::{html, Body, UiError};
use crate::ui::Dashboard;

fn expiry(expires_at: i64) -> String {
    if expires_at > 0 {
        time(expires_at)
    } else {
        "never".to_owned()
    }
}

/// `GET /access`
pub async fn page(dashboard: &Arc<Dashboard>) -> Result<Response<Body>, UiError> {
    let mut client = AccessClient::new(dashboard.channel.clone());
    let failure = |status| dashboard.rpc_failure(status);
    let status = client
        .access_status(AccessStatusRequest { version: 0 })
        .await
        .map_err(failure)?
        .into_inner();
    let grants = client
        .list_grants(ListGrantsRequest {
            user: String::new(),
        })
        .await
        .map_err(failure)?
        .into_inner()
        .grants;
    let report = client
        .access_report(AccessReportRequest::default())
        .await
        .map_err(failure)?
        .into_inner();
    let (drift, granted): (Vec<AccessReportEntry>, Vec<AccessReportEntry>) =
        report.entries.into_iter().partition(|entry| entry.drift);
    let body = html! {
        h2 { "Propagation" }
        p #propagation {
            "Policy version " (status.version) ": " (status.applied) " applied, "
            (status.pending) " pending, " (status.unreachable) " unreachable."
        }
        h2 { "Who can reach what" }
        table #reach {
            thead { tr { th { "user" } th { "machine" } th { "login" } th { "key" } th { "found on it" } th { "expires" } } }
            tbody {
                @for entry in granted.iter().filter(|entry| entry.granted) {
                    tr { td { (entry.user) } td { (entry.hostname) } td { (entry.login) }
                         td { (entry.key_type) " " (entry.fingerprint) } td { (entry.found) } td { (expiry(entry.expires_at)) } }
                }
            }
        }
        h2 { "Keys Flotte did not put there" }
        @if drift.is_empty() { p #no-drift { "None found." } }
        @else { div #drift { (keys_table(&drift)) } }
        @for missing in &report.missing_logins { p.drift { "missing login: " (missing) } }
        h2 { "Grants" }
        table {
            thead { tr { th { "grant" } th { "user" } th { "login" } th { "selector" } th { "machines" } th { "expires" } th { "by" } } }
            tbody {
                @for grant in &grants {
                    tr { td { (grant.id) } td { (grant.user) } td { (grant.login) } td { (grant.selector) }
                         td { (grant.machines) } td { (expiry(grant.expires_at)) } td { (grant.created_by) } }
                }
            }
        }
        h2 { "Machines" }
        table {
            thead { tr { th { "machine" } th { "status" } th { "applied version" } th { "applied at" } } }
            tbody {
                @for machine in &status.machines {
                    tr { td { (machine.hostname) } td.(format!("access-{}", machine.status)) { (machine.status) }
                         td { (machine.applied_version) } td { (time(machine.applied_at)) } }
                }
            }
        }
    };
    Ok(html(layout(
        &dashboard.operator,
        "Access",
        Section::Access,
        body,
    )))
}
