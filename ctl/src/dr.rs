//! `flottectl dr impact | report`: what losing zones would do to each group
//! of machines, and the groups whose operational machines all sit in one
//! zone.

use clap::Subcommand;
use flotte_proto::v1::disaster_recovery_client::DisasterRecoveryClient;
use flotte_proto::v1::{SinglePointsRequest, ZoneLossImpactRequest};
use serde::Serialize;

use crate::cli::{rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{print_json, print_line, print_table, Output};

#[derive(Debug, Subcommand)]
pub enum DrCommand {
    /// What if these zones were lost: per group, machines and operational
    /// capacity before and after, and the group's state.
    Impact {
        /// A zone to lose (repeatable).
        #[arg(long = "zone", required = true)]
        zones: Vec<String>,
        /// Label whose values make the groups.
        #[arg(long, default_value = "role")]
        by: String,
    },
    /// Single points of failure: groups whose operational machines all sit in one zone.
    Report {
        /// Label whose values make the groups.
        #[arg(long, default_value = "role")]
        by: String,
    },
}

pub async fn run(cli: &Cli, command: &DrCommand) -> Result<(), CtlError> {
    let (channel, diagnostics) = cli.connect().await?;
    let rpc = rpc_error(&diagnostics);
    let mut client = DisasterRecoveryClient::new(channel);
    match command {
        DrCommand::Impact { zones, by } => {
            let impact = client
                .zone_loss_impact(ZoneLossImpactRequest {
                    zones: zones.clone(),
                    by: by.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            #[derive(Serialize)]
            struct Row {
                group: String,
                machines_before: u32,
                machines_after: u32,
                operational_before: u32,
                operational_after: u32,
                minimum: Option<u32>,
                state_after: String,
            }
            let rows: Vec<Row> = impact
                .groups
                .iter()
                .map(|group| Row {
                    group: group.group.clone(),
                    machines_before: group.machines_before,
                    machines_after: group.machines_after,
                    operational_before: group.operational_before,
                    operational_after: group.operational_after,
                    minimum: (group.minimum > 0).then_some(group.minimum),
                    state_after: group.state_after.clone(),
                })
                .collect();
            if cli.output() == Output::Json {
                return print_json(&serde_json::json!({
                    "lost_zones": impact.zones,
                    "by": impact.by,
                    "groups": rows,
                }));
            }
            print_line!("if zone(s) {} were lost:", impact.zones.join(", "));
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|row| {
                    vec![
                        format!("{}={}", impact.by, row.group),
                        format!("{} -> {}", row.machines_before, row.machines_after),
                        format!("{} -> {}", row.operational_before, row.operational_after),
                        row.minimum
                            .map_or("-".to_owned(), |minimum| minimum.to_string()),
                        row.state_after.clone(),
                    ]
                })
                .collect();
            print_table(
                &["GROUP", "MACHINES", "OPERATIONAL", "MINIMUM", "STATE AFTER"],
                &table,
            );
        }
        DrCommand::Report { by } => {
            let report = client
                .single_points_of_failure(SinglePointsRequest { by: by.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            #[derive(Serialize)]
            struct Row {
                group: String,
                zone: String,
                operational: u32,
                machines: u32,
            }
            let rows: Vec<Row> = report
                .groups
                .iter()
                .map(|point| Row {
                    group: point.group.clone(),
                    zone: point.zone.clone(),
                    operational: point.operational,
                    machines: point.machines,
                })
                .collect();
            if cli.output() == Output::Json {
                return print_json(&serde_json::json!({
                    "by": report.by,
                    "single_points_of_failure": rows,
                }));
            }
            if rows.is_empty() {
                print_line!(
                    "no single point of failure: every {} group serves from two zones or more",
                    report.by
                );
                return Ok(());
            }
            print_line!("single points of failure (all operational machines in one zone):");
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|row| {
                    vec![
                        format!("{}={}", report.by, row.group),
                        row.zone.clone(),
                        format!("{} of {}", row.operational, row.machines),
                    ]
                })
                .collect();
            print_table(&["GROUP", "ONLY ZONE", "OPERATIONAL"], &table);
        }
    }
    Ok(())
}
