//! The audit page: the latest entries, filtered by actor and action, and
//! the verdict of the whole hash chain, verified here with the same pure
//! function as `flottectl audit verify` (not taken on the server's word).

use std::sync::Arc;

use flotte_common::audit::{verify_chain, AuditRecord};
use flotte_proto::v1::audit_client::AuditClient;
use flotte_proto::v1::ListAuditRequest;
use hyper::Response;
use maud::html;

use super::{layout, time, Section};
use crate::audit::{each_page, record_of};
use crate::ui::http::{html, Body, Parameters, UiError};
use crate::ui::Dashboard;

/// Entries shown, newest first.
const SHOWN_ENTRIES: usize = 200;

/// `GET /audit?actor=…&action=…`
pub async fn page(
    dashboard: &Arc<Dashboard>,
    query: &Parameters,
) -> Result<Response<Body>, UiError> {
    // Verification needs the whole chain (every page), so the filters
    // apply here.
    let mut records: Vec<AuditRecord> = Vec::new();
    each_page(
        &mut AuditClient::new(dashboard.channel.clone()),
        &|status| dashboard.rpc_failure(status),
        ListAuditRequest::default(),
        |page| {
            records.extend(page.entries.into_iter().map(record_of));
            Ok(())
        },
    )
    .await?;
    let (intact, verdict) = match verify_chain(&records) {
        Ok(summary) => (
            true,
            format!(
                "Chain intact: {} entries, head sha256 {}.",
                records.len(),
                summary.head_hash
            ),
        ),
        Err(broken) => (
            false,
            format!("Chain BROKEN at entry {}: {broken}", broken.seq()),
        ),
    };
    let actor = query.get("actor");
    let action = query.get("action");
    let shown: Vec<&AuditRecord> = records
        .iter()
        .rev()
        .filter(|record| actor.is_empty() || record.event.actor == actor)
        .filter(|record| action.is_empty() || record.event.action.starts_with(action))
        .take(SHOWN_ENTRIES)
        .collect();
    let body = html! {
        p #verdict class=(if intact { "intact" } else { "broken" }) { (verdict) }
        form.filter method="get" action="/audit" {
            label { "Actor " input type="text" name="actor" value=(actor); }
            label { "Action " input type="text" name="action" value=(action) placeholder="rollout."; }
            button type="submit" { "Filter" }
        }
        table #audit {
            thead { tr { th { "seq" } th { "time" } th { "actor" } th { "role" } th { "action" } th { "arguments" } th { "result" } } }
            tbody {
                @for record in &shown {
                    tr { td { (record.seq) } td { (time(record.event.at)) } td { (record.event.actor) } td { (record.event.role) }
                         td { (record.event.action) } td { code { (record.event.arguments_json) } } td { (record.event.result) } }
                }
            }
        }
    };
    Ok(html(layout(
        &dashboard.operator,
        "Audit",
        Section::Audit,
        body,
    )))
}
