//! The machine page: facts, labels, images and the last swap, checks with
//! their last output, the state timeline, the SSH keys found on it
//! (managed and drift), quarantine / release, and its forensic bundle.

use std::sync::Arc;

use flotte_common::roles::AdminRpc;
use flotte_proto::v1::access_client::AccessClient;
use flotte_proto::v1::machines_client::MachinesClient;
use flotte_proto::v1::repair_client::RepairClient;
use flotte_proto::v1::{
    AccessReportEntry, AccessReportRequest, GetForensicsRequest, GetMachineRequest, Machine,
    QuarantineMachineRequest, ReleaseMachineRequest,
};
use hyper::Response;
use maud::{html, Markup};

use super::fleet::shown_state;
use super::{action_button, layout, time, Section};
use crate::machines::view::image_name;
use crate::ui::http::{html, redirect, streamed, Body, UiError};
use crate::ui::{Dashboard, Operator};

fn facts(machine: &Machine) -> Markup {
    let image = machine.image.as_ref();
    let swap = image.and_then(|image| image.swap.as_ref());
    let sorted: std::collections::BTreeMap<&String, &String> = machine.labels.iter().collect();
    let labels = flotte_proto::labels::format_labels(sorted);
    html! {
        table.facts {
            tr { th { "state" } td.(format!("state-{}", shown_state(machine))) #machine-state { (shown_state(machine)) } }
            tr { th { "reason" } td { (machine.state_reason) " (since " (time(machine.state_since)) ")" } }
            tr { th { "id" } td { (machine.id) } }
            tr { th { "zone" } td { (machine.zone) } }
            tr { th { "labels" } td { (labels) } }
            tr {
                th { "connected" }
                td {
                    (machine.connected) ", last seen " (time(machine.last_seen))
                    @if !machine.replica.is_empty() { ", session held by replica " (machine.replica) }
                }
            }
            tr { th { "agent version" } td { (machine.agent_version) } }
            tr { th { "system" } td { (machine.os) " " (machine.kernel) " " (machine.arch) } }
            tr { th { "current image" } td { (image_name(image.and_then(|image| image.current.as_ref())).unwrap_or_default()) } }
            tr { th { "previous image" } td { (image_name(image.and_then(|image| image.previous.as_ref())).unwrap_or_default()) } }
            tr { th { "desired image" } td { (image_name(machine.desired_image.as_ref()).unwrap_or_default()) } }
            @if let Some(swap) = swap {
                tr {
                    th { "last swap" }
                    td {
                        (image_name(swap.target.as_ref()).unwrap_or_default()) ": " (swap.step) " (" (swap.outcome) ") "
                        (swap.message) " at " (time(swap.updated_at))
                    }
                }
            }
        }
    }
}

fn checks(machine: &Machine) -> Markup {
    html! {
        h2 { "Checks" }
        @if machine.checks.is_empty() { p { "No check reported." } }
        @else {
            table {
                thead { tr { th { "name" } th { "kind" } th { "target" } th { "critical" } th { "healthy" } th { "last run" } th { "last output" } } }
                tbody {
                    @for check in &machine.checks {
                        tr class=(if check.healthy { "healthy" } else { "unhealthy" }) {
                            td { (check.name) } td { (check.kind) } td { (check.target) }
                            td { (check.critical) } td { (check.healthy) }
                            td { (time(check.last_run_at)) }
                            td { pre { (check.last_output) } }
                        }
                    }
                }
            }
        }
    }
}

fn timeline(machine: &Machine) -> Markup {
    html! {
        h2 { "State transitions" }
        @if machine.transitions.is_empty() { p { "None recorded." } }
        @else {
            table {
                thead { tr { th { "at" } th { "from" } th { "to" } th { "reason" } } }
                tbody {
                    @for transition in machine.transitions.iter().rev() {
                        tr { td { (time(transition.at)) } td { (transition.from) } td { (transition.to) } td { (transition.reason) } }
                    }
                }
            }
        }
    }
}

/// The keys of the access report on this machine (managed and drift).
pub fn keys_table(entries: &[AccessReportEntry]) -> Markup {
    html! {
        table {
            thead { tr { th { "machine" } th { "login" } th { "user" } th { "key" } th { "granted" } th { "found" } th { "where" } th { "expires" } } }
            tbody {
                @for entry in entries {
                    tr class=[entry.drift.then_some("drift")] {
                        td { (entry.hostname) } td { (entry.login) }
                        td { @if entry.user.is_empty() { em { "unknown to Flotte" } } @else { (entry.user) } }
                        td { (entry.key_type) " " (entry.fingerprint) }
                        td { (entry.granted) } td { (entry.found) }
                        td { (entry.sources.join(", ")) }
                        td { (if entry.expires_at > 0 { time(entry.expires_at) } else { String::new() }) }
                    }
                }
            }
        }
    }
}

fn quarantine_section(operator: &Operator, machine: &Machine) -> Markup {
    let base = format!("/machines/{}", machine.id);
    html! {
        h2 { "Quarantine" }
        @if let Some(quarantine) = &machine.quarantine {
            p #quarantine {
                "Quarantined since " (time(quarantine.since)) " by " (quarantine.by) ": " (quarantine.reason)
            }
            @if operator.may(AdminRpc::ReleaseMachine) {
                (action_button(&format!("{base}/release"), "action-release", "Release",
                    &format!("Release {}: it goes back in service and its on_release hook runs.", machine.hostname)))
            }
        } @else {
            p { "In service." }
            @if operator.may(AdminRpc::QuarantineMachine) {
                form.action method="post" action=(format!("{base}/quarantine"))
                    data-confirm=(format!("Quarantine {}: it leaves service (rollouts skip it), runs its on_quarantine hook and uploads a forensic bundle; nothing is wiped.", machine.hostname)) {
                    label { "Reason " input type="text" name="reason" maxlength="1024"; }
                    button type="submit" #action-quarantine { "Quarantine" }
                }
            }
        }
        @if operator.may(AdminRpc::GetForensics) {
            p { a href=(format!("{base}/forensics")) { "Download the latest forensic bundle" } }
        }
    }
}

/// `GET /machines/ID`
pub async fn page(dashboard: &Arc<Dashboard>, id: &str) -> Result<Response<Body>, UiError> {
    let machine = MachinesClient::new(dashboard.channel.clone())
        .get_machine(GetMachineRequest { id: id.to_owned() })
        .await
        .map_err(|status| dashboard.rpc_failure(status))?
        .into_inner();
    let keys = if dashboard.operator.may(AdminRpc::AccessReport) {
        let report = AccessClient::new(dashboard.channel.clone())
            .access_report(AccessReportRequest {
                user: String::new(),
                machine: machine.id.clone(),
            })
            .await
            .map_err(|status| dashboard.rpc_failure(status))?
            .into_inner();
        html! {
            h2 { "SSH keys" }
            (keys_table(&report.entries))
            @for missing in &report.missing_logins { p.drift { "missing login: " (missing) } }
        }
    } else {
        html! {}
    };
    let body = html! {
        (facts(&machine))
        (quarantine_section(&dashboard.operator, &machine))
        (checks(&machine))
        (timeline(&machine))
        (keys)
    };
    let title = format!("Machine {}", machine.hostname);
    Ok(html(layout(
        &dashboard.operator,
        &title,
        Section::Fleet,
        body,
    )))
}

/// `POST /machines/ID/quarantine` (form: reason)
pub async fn quarantine(
    dashboard: &Arc<Dashboard>,
    id: &str,
    reason: &str,
) -> Result<Response<Body>, UiError> {
    let info = RepairClient::new(dashboard.channel.clone())
        .quarantine_machine(QuarantineMachineRequest {
            id: id.to_owned(),
            reason: reason.to_owned(),
        })
        .await
        .map_err(|status| dashboard.rpc_failure(status))?
        .into_inner();
    Ok(redirect(&format!("/machines/{}", info.machine_id)))
}

/// `POST /machines/ID/release`
pub async fn release(dashboard: &Arc<Dashboard>, id: &str) -> Result<Response<Body>, UiError> {
    let info = RepairClient::new(dashboard.channel.clone())
        .release_machine(ReleaseMachineRequest { id: id.to_owned() })
        .await
        .map_err(|status| dashboard.rpc_failure(status))?
        .into_inner();
    Ok(redirect(&format!("/machines/{}", info.machine_id)))
}

/// `GET /machines/ID/forensics`: the latest bundle, streamed as it arrives.
pub async fn forensics(dashboard: &Arc<Dashboard>, id: &str) -> Result<Response<Body>, UiError> {
    let mut chunks = RepairClient::new(dashboard.channel.clone())
        .get_forensics(GetForensicsRequest {
            id: id.to_owned(),
            quarantine_id: String::new(),
            list_only: false,
        })
        .await
        .map_err(|status| dashboard.rpc_failure(status))?
        .into_inner();
    let first = chunks
        .message()
        .await
        .map_err(|status| dashboard.rpc_failure(status))?
        .ok_or_else(|| UiError::NotFound(format!("no forensic bundle of {id}")))?;
    // Ids are the server's (UUIDs): safe in a file name, but keep only
    // their characters anyway.
    let name: String = format!("forensics-{}-{}.tar", first.machine_id, first.quarantine_id)
        .chars()
        .filter(|character| character.is_ascii_alphanumeric() || matches!(character, '-' | '.'))
        .collect();
    // The length announced up front makes a download cut short fail in the
    // browser instead of leaving a truncated file that looks whole.
    let length = first.size;
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let failure_note = Arc::clone(dashboard);
    tokio::spawn(async move {
        if sender.send(first.data.into()).await.is_err() {
            return;
        }
        loop {
            match chunks.message().await {
                Ok(Some(chunk)) => {
                    if sender.send(chunk.data.into()).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    // The download is cut short; the browser shows it failed.
                    let error = failure_note.rpc_failure(status);
                    crate::output::note_line!("dashboard: forensic download cut: {error}");
                    return;
                }
            }
        }
    });
    let mut response = streamed("application/x-tar", receiver);
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_LENGTH, length.into());
    if let Ok(value) =
        hyper::header::HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
    {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}
