//! The disaster-recovery page: pick zones, see each group's machines and
//! operational capacity before and after losing them against its minimum
//! (`ZoneLossImpact`), and the groups whose operational machines all sit in
//! one zone (`SinglePointsOfFailure`).

use std::sync::Arc;

use flotte_proto::v1::disaster_recovery_client::DisasterRecoveryClient;
use flotte_proto::v1::machines_client::MachinesClient;
use flotte_proto::v1::{FleetStatusRequest, SinglePointsRequest, ZoneLossImpactRequest};
use hyper::Response;
use maud::html;

use super::{layout, Section};
use crate::ui::http::{html, Body, Parameters, UiError};
use crate::ui::Dashboard;

/// The label grouping machines when the form names none (as `dr impact`).
const DEFAULT_GROUPING: &str = "role";

/// `GET /dr?zones=…&zones=…&by=…`
pub async fn page(
    dashboard: &Arc<Dashboard>,
    query: &Parameters,
) -> Result<Response<Body>, UiError> {
    let failure = |status| dashboard.rpc_failure(status);
    let by = match query.get("by") {
        "" => DEFAULT_GROUPING,
        by => by,
    };
    let chosen = query.all("zones");
    let zones: Vec<String> = MachinesClient::new(dashboard.channel.clone())
        .fleet_status(FleetStatusRequest::default())
        .await
        .map_err(failure)?
        .into_inner()
        .zones
        .into_iter()
        .map(|zone| zone.name)
        .collect();
    let mut client = DisasterRecoveryClient::new(dashboard.channel.clone());
    let impact = if chosen.is_empty() {
        None
    } else {
        Some(
            client
                .zone_loss_impact(ZoneLossImpactRequest {
                    zones: chosen.clone(),
                    by: by.to_owned(),
                })
                .await
                .map_err(failure)?
                .into_inner(),
        )
    };
    let single_points = client
        .single_points_of_failure(SinglePointsRequest { by: by.to_owned() })
        .await
        .map_err(failure)?
        .into_inner();
    let body = html! {
        form.filter method="get" action="/dr" {
            fieldset {
                legend { "Zones lost" }
                @for zone in &zones {
                    label { input type="checkbox" name="zones" value=(zone) checked[chosen.contains(zone)]; (zone) }
                }
            }
            label { "Group by label " input type="text" name="by" value=(by); }
            button type="submit" { "Show the impact" }
        }
        @if let Some(impact) = &impact {
            h2 { "Losing " (impact.zones.join(", ")) }
            table #impact {
                thead { tr { th { (impact.by) } th { "machines" } th { "operational" } th { "minimum" } th { "state after" } } }
                tbody {
                    @for group in &impact.groups {
                        tr {
                            td { (group.group) }
                            td { (group.machines_before) " → " (group.machines_after) }
                            td { (group.operational_before) " → " (group.operational_after) }
                            td { @if group.minimum > 0 { (group.minimum) } @else { "none" } }
                            td.(format!("state-{}", group.state_after)) { (group.state_after) }
                        }
                    }
                }
            }
        }
        h2 { "Single points of failure" }
        @if single_points.groups.is_empty() { p { "None: no group has all its operational machines in one zone." } }
        @else {
            table #single-points {
                thead { tr { th { (single_points.by) } th { "zone" } th { "operational" } th { "machines" } } }
                tbody {
                    @for point in &single_points.groups {
                        tr { td { (point.group) } td { (point.zone) } td { (point.operational) } td { (point.machines) } }
                    }
                }
            }
        }
    };
    Ok(html(layout(
        &dashboard.operator,
        "Disaster recovery",
        Section::DisasterRecovery,
        body,
    )))
}
