//! `flottectl status`: machines per state for the whole fleet, per zone and
//! per value of a label, with the remediation line (on, in progress,
//! breaker) and the server replicas (name, zone, address, leader, sessions
//! held, lease age).

use std::collections::BTreeMap;

use clap::Args;
use flotte_proto::v1::machines_client::MachinesClient;
use flotte_proto::v1::{FleetStatusRequest, FleetStatusResponse, GroupStatus, Replica};
use serde::Serialize;

use crate::cli::{rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{print_json, print_table, Output};
use crate::repair::{print_remediation_status, remediation_status, RemediationStatusView};

// The arguments of `status` (its help text is the subcommand's, in `cli`).
#[derive(Debug, Args)]
pub struct StatusArguments {
    /// Label whose values to group by, e.g. role.
    #[arg(long, default_value = "")]
    by: String,
    #[arg(long, default_value = "", value_parser = crate::cli::selector_argument, help = crate::cli::SELECTOR_HELP)]
    selector: String,
}

#[derive(Debug, Serialize)]
struct GroupView {
    name: String,
    machines: u32,
    states: BTreeMap<String, u32>,
}

impl From<&GroupStatus> for GroupView {
    fn from(group: &GroupStatus) -> Self {
        GroupView {
            name: group.name.clone(),
            machines: group.machines,
            states: group
                .states
                .iter()
                .map(|count| (count.state.clone(), count.machines))
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
struct ReplicaView {
    name: String,
    zone: String,
    address: String,
    leader: bool,
    sessions: u64,
    lease_age_ms: i64,
    live: bool,
}

impl From<&Replica> for ReplicaView {
    fn from(replica: &Replica) -> Self {
        ReplicaView {
            name: replica.name.clone(),
            zone: replica.zone.clone(),
            address: replica.address.clone(),
            leader: replica.leader,
            sessions: replica.sessions,
            lease_age_ms: replica.lease_age_ms,
            live: replica.live,
        }
    }
}

fn print_replicas(replicas: &[ReplicaView]) {
    if replicas.is_empty() {
        return;
    }
    println!();
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|replica| {
            vec![
                replica.name.clone(),
                replica.zone.clone(),
                replica.address.clone(),
                if replica.leader { "yes" } else { "" }.to_owned(),
                replica.sessions.to_string(),
                if replica.live {
                    format!("{:.1}s", replica.lease_age_ms as f64 / 1000.0)
                } else {
                    format!("{:.1}s (lapsed)", replica.lease_age_ms as f64 / 1000.0)
                },
            ]
        })
        .collect();
    print_table(
        &[
            "REPLICA",
            "ZONE",
            "ADDRESS",
            "LEADER",
            "SESSIONS",
            "LEASE AGE",
        ],
        &rows,
    );
}

fn print_status(
    output: Output,
    status: &FleetStatusResponse,
    remediation: &RemediationStatusView,
) -> Result<(), CtlError> {
    let fleet = status.fleet.as_ref().map(GroupView::from);
    let zones: Vec<GroupView> = status.zones.iter().map(GroupView::from).collect();
    let groups: Vec<GroupView> = status.groups.iter().map(GroupView::from).collect();
    let replicas: Vec<ReplicaView> = status.replicas.iter().map(ReplicaView::from).collect();
    if output == Output::Json {
        #[derive(Serialize)]
        struct StatusView<'a> {
            fleet: Option<GroupView>,
            zones: Vec<GroupView>,
            by: &'a str,
            groups: Vec<GroupView>,
            remediation: &'a RemediationStatusView,
            replicas: Vec<ReplicaView>,
            machines_on_old_images: u32,
            image_max_age_days: u64,
        }
        return print_json(&StatusView {
            fleet,
            zones,
            by: &status.by,
            groups,
            remediation,
            replicas,
            machines_on_old_images: status.machines_on_old_images,
            image_max_age_days: status.image_max_age_seconds / 86_400,
        });
    }
    let states = ["operational", "degraded", "down", "unreachable", "unknown"];
    let row = |group: &GroupView| {
        let mut cells = vec![group.name.clone(), group.machines.to_string()];
        cells.extend(
            states
                .iter()
                .map(|state| group.states.get(*state).copied().unwrap_or(0).to_string()),
        );
        cells
    };
    let mut headers = vec!["GROUP", "MACHINES"];
    headers.extend(states.iter().copied());
    let mut rows: Vec<Vec<String>> = fleet.iter().map(row).collect();
    rows.extend(zones.iter().map(|zone| {
        let mut cells = row(zone);
        cells[0] = format!("zone={}", zone.name);
        cells
    }));
    rows.extend(groups.iter().map(|group| {
        let mut cells = row(group);
        cells[0] = format!("{}={}", status.by, group.name);
        cells
    }));
    print_table(&headers, &rows);
    crate::output::print_line!(
        "machines on images older than {} days: {}",
        status.image_max_age_seconds / 86_400,
        status.machines_on_old_images
    );
    print_remediation_status(remediation);
    print_replicas(&replicas);
    Ok(())
}

pub async fn run(cli: &Cli, arguments: &StatusArguments) -> Result<(), CtlError> {
    let (channel, diagnostics) = cli.connect().await?;
    let rpc = rpc_error(&diagnostics);
    let status = MachinesClient::new(channel.clone())
        .fleet_status(FleetStatusRequest {
            by: arguments.by.clone(),
            selector: arguments.selector.clone(),
        })
        .await
        .map_err(&rpc)?
        .into_inner();
    let remediation = remediation_status(channel, &rpc).await?;
    print_status(cli.output(), &status, &remediation)
}
