//! The fleet page: machines per state, per zone, and a grid of tiles
//! coloured by state, filtered by a selector, live.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotte_proto::v1::machines_client::MachinesClient;
use flotte_proto::v1::{ListMachinesRequest, Machine};
use hyper::Response;
use maud::{html, Markup};

use super::{layout, Section};
use crate::ui::http::{html, with_query, Body, Parameters, UiError};
use crate::ui::Dashboard;

/// The states a tile can show, in the counts' column order. Quarantined
/// and retired hide the health state: such a machine is out of service.
pub const STATES: [&str; 7] = [
    "operational",
    "degraded",
    "down",
    "unreachable",
    "unknown",
    "quarantined",
    "retired",
];

/// The state a machine's tile shows (one of [`STATES`]).
pub fn shown_state(machine: &Machine) -> &'static str {
    if machine.retired_at > 0 {
        return "retired";
    }
    if machine.quarantine.is_some() {
        return "quarantined";
    }
    STATES
        .iter()
        .find(|state| **state == machine.state)
        .copied()
        .unwrap_or("unknown")
}

/// Why the tile shows its state: the quarantine's reason, or the health
/// state's.
fn shown_reason(machine: &Machine) -> String {
    match &machine.quarantine {
        Some(quarantine) => format!("quarantined by {}: {}", quarantine.by, quarantine.reason),
        None => machine.state_reason.clone(),
    }
}

fn count_row(name: &str, counts: &BTreeMap<&str, u32>) -> Markup {
    let total: u32 = counts.values().sum();
    html! {
        tr {
            th { (name) }
            td data-count=(format!("{name}/machines")) { (total) }
            @for state in STATES {
                td.(format!("count-{state}")) data-count=(format!("{name}/{state}")) {
                    (counts.get(state).copied().unwrap_or(0))
                }
            }
        }
    }
}

/// The live part of the page: the counts and the tiles.
pub fn render_fleet(machines: &[Machine]) -> Markup {
    let mut fleet: BTreeMap<&str, u32> = BTreeMap::new();
    let mut zones: BTreeMap<&str, BTreeMap<&str, u32>> = BTreeMap::new();
    for machine in machines {
        let state = shown_state(machine);
        *fleet.entry(state).or_default() += 1;
        *zones
            .entry(machine.zone.as_str())
            .or_default()
            .entry(state)
            .or_default() += 1;
    }
    html! {
        table.counts {
            thead {
                tr {
                    th { "zone" }
                    th { "machines" }
                    @for state in STATES { th { (state) } }
                }
            }
            tbody {
                (count_row("fleet", &fleet))
                @for (zone, counts) in &zones { (count_row(zone, counts)) }
            }
        }
        div.grid {
            @for machine in machines {
                @let state = shown_state(machine);
                a.tile.(format!("state-{state}"))
                    href=(format!("/machines/{}", machine.id))
                    data-hostname=(machine.hostname)
                    data-state=(state)
                    title=(shown_reason(machine)) {
                    span.name { (machine.hostname) }
                    span.zone { (machine.zone) }
                    span.state { (state) }
                }
            }
        }
        @if machines.is_empty() { p { "No machine matches." } }
    }
}

/// The live section, listed now.
pub async fn live_section(dashboard: &Dashboard, selector: &str) -> Result<Markup, UiError> {
    let machines = MachinesClient::new(dashboard.channel.clone())
        .list_machines(ListMachinesRequest {
            selector: selector.to_owned(),
        })
        .await
        .map_err(|status| dashboard.rpc_failure(status))?
        .into_inner()
        .machines;
    Ok(render_fleet(&machines))
}

/// `GET /?selector=…`
pub async fn page(
    dashboard: &Arc<Dashboard>,
    query: &Parameters,
) -> Result<Response<Body>, UiError> {
    let selector = query.get("selector");
    let section = live_section(dashboard, selector).await?;
    let events = with_query("/events/fleet", [("selector", selector)]);
    let body = html! {
        form.filter method="get" action="/" {
            label { "Selector " input type="text" name="selector" value=(selector) placeholder="env=prod,zone=dc1"; }
            button type="submit" { "Filter" }
        }
        section #fleet data-live=(events) { (section) }
    };
    Ok(html(layout(
        &dashboard.operator,
        "Fleet",
        Section::Fleet,
        body,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotte_proto::v1::Quarantine;

    fn machine(hostname: &str, zone: &str, state: &str) -> Machine {
        Machine {
            id: format!("id-{hostname}"),
            hostname: hostname.into(),
            zone: zone.into(),
            state: state.into(),
            ..Machine::default()
        }
    }

    #[test]
    fn tiles_show_quarantine_and_retirement_over_health_and_count_per_zone() {
        let mut quarantined = machine("b", "dc2", "operational");
        quarantined.quarantine = Some(Quarantine {
            reason: "disk".into(),
            by: "alice".into(),
            ..Quarantine::default()
        });
        let mut retired = machine("c", "dc2", "unreachable");
        retired.retired_at = 5;
        let strange = machine("d", "dc1", "<b>new-state</b>");
        let machines = [
            machine("a", "dc1", "operational"),
            quarantined,
            retired,
            strange,
        ];
        let states: Vec<&str> = machines.iter().map(shown_state).collect();
        assert_eq!(states, ["operational", "quarantined", "retired", "unknown"]);
        let rendered = render_fleet(&machines).into_string();
        assert!(
            rendered.contains(r#"data-count="dc2/quarantined">1<"#),
            "{rendered}"
        );
        assert!(
            rendered.contains(r#"data-count="fleet/machines">4<"#),
            "{rendered}"
        );
        assert!(!rendered.contains("<b>new-state"), "{rendered}");
    }

    #[test]
    fn hostile_text_in_a_reason_is_escaped() {
        let mut hostile = machine("web-1", "dc1", "down");
        hostile.state_reason = r#""><script>alert(1)</script><img src=x onerror=alert(2)>"#.into();
        let rendered = render_fleet(&[hostile]).into_string();
        assert!(!rendered.contains("<script>"), "{rendered}");
        assert!(!rendered.contains("<img"), "{rendered}");
        assert!(
            rendered.contains("&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{rendered}"
        );
    }
}
