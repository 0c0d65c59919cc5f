//! `flottectl machines list | show | watch | label | set-image |
//! decommission`, (from `repair`) `quarantine | release | forensics`, and
//! (from `integrity`) `verify | restore-image`:
//! the enrolled machines. Their views and rendering live in `view`.

use clap::Subcommand;
use flotte_proto::labels::parse_labels;
use flotte_proto::v1::machines_client::MachinesClient;
use flotte_proto::v1::{
    DecommissionMachineRequest, GetMachineRequest, ListMachinesRequest, SetImageRequest,
    SetLabelsRequest, WatchMachinesRequest,
};

use crate::cli::{rpc_error, selector_argument, Cli, SELECTOR_HELP};
use crate::error::CtlError;
use crate::output::{note_line, Output};
use crate::repair;

pub(crate) mod view;

use view::{print_event, print_machine, print_machines};

#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// List machines, optionally filtered by a label selector.
    List {
        #[arg(long, default_value = "", value_parser = selector_argument, help = SELECTOR_HELP)]
        selector: String,
    },
    /// Show one machine by id, id prefix or hostname.
    Show {
        /// The machine: id, id prefix or hostname.
        id: String,
    },
    /// Stream state changes as they happen (first the current states).
    Watch {
        #[arg(long, default_value = "", value_parser = selector_argument, help = SELECTOR_HELP)]
        selector: String,
    },
    /// Change a machine's labels (pushed to its agent at once).
    Label {
        /// The machine: id, id prefix or hostname.
        id: String,
        /// Labels to add or change: k=v,k2=v2.
        #[arg(long, default_value = "")]
        set: String,
        /// Label keys to remove: k,k2.
        #[arg(long, default_value = "")]
        remove: String,
    },
    /// Retire a machine for good: its certificates are revoked, its session
    /// closed, and it can never reconnect.
    Decommission {
        /// The machine: id, id prefix or hostname.
        id: String,
    },
    /// Set the image a machine must run (name@version).
    SetImage {
        /// The machine: id, id prefix or hostname.
        id: String,
        /// The image, name@version, pushed with `image push`.
        reference: String,
        /// Allow going to a lower version than the machine runs.
        #[arg(long)]
        rollback: bool,
    },
    #[command(flatten)]
    Repair(repair::MachineRepairCommand),
    #[command(flatten)]
    Integrity(crate::integrity::MachineIntegrityCommand),
}

pub async fn run(cli: &Cli, command: &MachinesCommand) -> Result<(), CtlError> {
    if let MachinesCommand::Repair(command) = command {
        return repair::run_machine_repair(cli, command).await;
    }
    if let MachinesCommand::Integrity(command) = command {
        return crate::integrity::run_machine_integrity(cli, command).await;
    }
    let (channel, diagnostics) = cli.connect().await?;
    let rpc = rpc_error(&diagnostics);
    let mut client = MachinesClient::new(channel);
    match command {
        MachinesCommand::List { selector } => {
            let machines = client
                .list_machines(ListMachinesRequest {
                    selector: selector.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner()
                .machines;
            print_machines(cli.output(), cli.wide(), &machines)?;
        }
        MachinesCommand::Show { id } => {
            let machine = client
                .get_machine(GetMachineRequest { id: id.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_machine(cli.output(), &machine)?;
            if cli.output() == Output::Table {
                crate::integrity::print_last_verification(cli, &machine.id).await?;
            }
        }
        MachinesCommand::Watch { selector } => {
            let mut events = client
                .watch(WatchMachinesRequest {
                    selector: selector.clone(),
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            while let Some(event) = events.message().await.map_err(&rpc)? {
                print_event(cli.output(), &event)?;
            }
            return Err(CtlError::Rpc("the server ended the watch".into()));
        }
        MachinesCommand::Decommission { id } => {
            let machine = client
                .decommission_machine(DecommissionMachineRequest { id: id.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            if cli.output() != Output::Json {
                note_line!(
                    "machine {} ({}) decommissioned: its certificates are revoked and it cannot reconnect",
                    machine.id, machine.hostname
                );
            }
            print_machine(cli.output(), &machine)?;
        }
        MachinesCommand::SetImage {
            id,
            reference,
            rollback,
        } => {
            let machine = client
                .set_image(SetImageRequest {
                    id: id.clone(),
                    reference: reference.clone(),
                    rollback: *rollback,
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_machine(cli.output(), &machine)?;
        }
        MachinesCommand::Repair(_) | MachinesCommand::Integrity(_) => {}
        MachinesCommand::Label { id, set, remove } => {
            let set =
                parse_labels(set).map_err(|error| CtlError::Usage(format!("--set: {error}")))?;
            let remove: Vec<String> = remove
                .split(',')
                .map(str::trim)
                .filter(|key| !key.is_empty())
                .map(str::to_owned)
                .collect();
            if set.is_empty() && remove.is_empty() {
                return Err(CtlError::Usage("give --set and/or --remove".into()));
            }
            let machine = client
                .set_labels(SetLabelsRequest {
                    id: id.clone(),
                    set: set.into_iter().collect(),
                    remove,
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_machine(cli.output(), &machine)?;
        }
    }
    Ok(())
}
