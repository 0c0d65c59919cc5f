//! The views of a machine (`machines list | show`, and the machine part of
//! `set-image`, `label`, `decommission`): what the proto says, with times as
//! RFC 3339 and unset values as `null`.

use std::collections::BTreeMap;

use flotte_proto::labels::format_labels;
use flotte_proto::v1::{CheckResult, Machine, MachineEvent, StateTransition, SystemMetrics};
use serde::Serialize;

use crate::error::CtlError;
use crate::output::{
    format_time, optional_time, print_fields, print_json, print_json_line, print_line, print_list,
    print_table, Output,
};
use crate::repair::QuarantineView;

/// Column of the values in `machines show`.
const FIELD_WIDTH: usize = 20;

#[derive(Debug, Serialize)]
struct MachineView {
    id: String,
    hostname: String,
    zone: String,
    labels: BTreeMap<String, String>,
    connected: bool,
    last_seen: Option<String>,
    agent_version: String,
    certificate_expires_at: Option<String>,
    os: String,
    kernel: String,
    arch: String,
    boot_time: Option<String>,
    enrolled_at: Option<String>,
    identity: String,
    remote_address: Option<String>,
    /// The server replica holding its session.
    replica: Option<String>,
    desired_version: u64,
    applied_desired_version: u64,
    retired_at: Option<String>,
    state: String,
    state_reason: String,
    state_since: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checks: Vec<CheckView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<MetricsView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    metric_breaches: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    transitions: Vec<TransitionView>,
    /// `name@version` the machine runs, ran before, and must run.
    current_image: Option<String>,
    /// When the current image was built (its signed manifest's created_at).
    current_image_created_at: Option<String>,
    previous_image: Option<String>,
    desired_image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_swap: Option<SwapView>,
    /// Set while quarantined (kept for investigation, out of service).
    quarantine: Option<QuarantineView>,
}

#[derive(Debug, Serialize)]
struct SwapView {
    target: Option<String>,
    step: String,
    outcome: String,
    message: String,
    bytes_downloaded: u64,
    updated_at: Option<String>,
}

pub(crate) fn image_name(image: Option<&flotte_proto::v1::ImageRef>) -> Option<String> {
    image
        .filter(|image| !image.name.is_empty())
        .map(|image| format!("{}@{}", image.name, image.version))
}

#[derive(Debug, Serialize)]
struct CheckView {
    name: String,
    kind: String,
    target: String,
    critical: bool,
    healthy: bool,
    last_passed: bool,
    last_output: String,
    last_run_at: Option<String>,
    last_duration_ms: u32,
    consecutive: u32,
}

impl From<&CheckResult> for CheckView {
    fn from(check: &CheckResult) -> Self {
        CheckView {
            name: check.name.clone(),
            kind: check.kind.clone(),
            target: check.target.clone(),
            critical: check.critical,
            healthy: check.healthy,
            last_passed: check.last_passed,
            last_output: check.last_output.clone(),
            last_run_at: optional_time(check.last_run_at),
            last_duration_ms: check.last_duration_ms,
            consecutive: check.consecutive,
        }
    }
}

#[derive(Debug, Serialize)]
struct DiskView {
    mount: String,
    total_bytes: u64,
    used_bytes: u64,
    available_bytes: u64,
    used_percent: f64,
}

#[derive(Debug, Serialize)]
struct MetricsView {
    disks: Vec<DiskView>,
    memory_total_bytes: u64,
    memory_available_bytes: u64,
    load1: f64,
    load5: f64,
    load15: f64,
    uptime_seconds: u64,
}

impl From<&SystemMetrics> for MetricsView {
    fn from(metrics: &SystemMetrics) -> Self {
        MetricsView {
            disks: metrics
                .disks
                .iter()
                .map(|disk| DiskView {
                    mount: disk.mount.clone(),
                    total_bytes: disk.total_bytes,
                    used_bytes: disk.used_bytes,
                    available_bytes: disk.available_bytes,
                    used_percent: if disk.total_bytes == 0 {
                        0.0
                    } else {
                        disk.used_bytes as f64 * 100.0 / disk.total_bytes as f64
                    },
                })
                .collect(),
            memory_total_bytes: metrics.memory_total_bytes,
            memory_available_bytes: metrics.memory_available_bytes,
            load1: metrics.load1,
            load5: metrics.load5,
            load15: metrics.load15,
            uptime_seconds: metrics.uptime_seconds,
        }
    }
}

#[derive(Debug, Serialize)]
struct TransitionView {
    at: String,
    from: String,
    to: String,
    reason: String,
}

impl From<&StateTransition> for TransitionView {
    fn from(transition: &StateTransition) -> Self {
        TransitionView {
            at: format_time(transition.at),
            from: transition.from.clone(),
            to: transition.to.clone(),
            reason: transition.reason.clone(),
        }
    }
}

impl From<&Machine> for MachineView {
    fn from(machine: &Machine) -> Self {
        MachineView {
            id: machine.id.clone(),
            hostname: machine.hostname.clone(),
            zone: machine.zone.clone(),
            labels: machine.labels.clone().into_iter().collect(),
            connected: machine.connected,
            last_seen: optional_time(machine.last_seen),
            agent_version: machine.agent_version.clone(),
            certificate_expires_at: optional_time(machine.certificate_not_after),
            os: machine.os.clone(),
            kernel: machine.kernel.clone(),
            arch: machine.arch.clone(),
            boot_time: optional_time(machine.boot_time),
            enrolled_at: optional_time(machine.enrolled_at),
            identity: machine.identity_uri.clone(),
            remote_address: (!machine.remote_address.is_empty())
                .then(|| machine.remote_address.clone()),
            replica: (!machine.replica.is_empty()).then(|| machine.replica.clone()),
            desired_version: machine.desired_version,
            applied_desired_version: machine.applied_desired_version,
            retired_at: optional_time(machine.retired_at),
            state: machine.state.clone(),
            state_reason: machine.state_reason.clone(),
            state_since: optional_time(machine.state_since),
            checks: machine.checks.iter().map(CheckView::from).collect(),
            metrics: machine.metrics.as_ref().map(MetricsView::from),
            metric_breaches: machine.metric_breaches.clone(),
            transitions: machine
                .transitions
                .iter()
                .map(TransitionView::from)
                .collect(),
            current_image: image_name(
                machine
                    .image
                    .as_ref()
                    .and_then(|image| image.current.as_ref()),
            ),
            current_image_created_at: optional_time(machine.current_image_created_at),
            previous_image: image_name(
                machine
                    .image
                    .as_ref()
                    .and_then(|image| image.previous.as_ref()),
            ),
            desired_image: image_name(machine.desired_image.as_ref()),
            last_swap: machine
                .image
                .as_ref()
                .and_then(|image| image.swap.as_ref())
                .map(|swap| SwapView {
                    target: image_name(swap.target.as_ref()),
                    step: swap.step.clone(),
                    outcome: swap.outcome.clone(),
                    message: swap.message.clone(),
                    bytes_downloaded: swap.bytes_downloaded,
                    updated_at: optional_time(swap.updated_at),
                }),
            quarantine: machine.quarantine.as_ref().map(QuarantineView::from),
        }
    }
}

/// The columns of `machines list`, and the ones `-o wide` adds after them.
const LIST_COLUMNS: [&str; 11] = [
    "ID",
    "HOSTNAME",
    "ZONE",
    "STATE",
    "LABELS",
    "CONNECTED",
    "LAST SEEN",
    "AGENT",
    "REPLICA",
    "IMAGE",
    "IMAGE BUILT",
];
const WIDE_COLUMNS: [&str; 7] = [
    "ADDRESS",
    "OS",
    "KERNEL",
    "ARCH",
    "DESIRED IMAGE",
    "APPLIED",
    "CERT EXPIRES",
];

fn list_row(machine: &MachineView) -> Vec<String> {
    vec![
        machine.id.clone(),
        machine.hostname.clone(),
        machine.zone.clone(),
        match &machine.quarantine {
            Some(_) => format!("{} [quarantined]", machine.state),
            None => machine.state.clone(),
        },
        format_labels(&machine.labels),
        match (machine.retired_at.is_some(), machine.connected) {
            (true, _) => "retired",
            (false, true) => "yes",
            (false, false) => "no",
        }
        .to_owned(),
        machine.last_seen.clone().unwrap_or_else(|| "never".into()),
        machine.agent_version.clone(),
        machine.replica.clone().unwrap_or_default(),
        machine.current_image.clone().unwrap_or_default(),
        machine.current_image_created_at.clone().unwrap_or_default(),
    ]
}

/// The columns `-o wide` adds: where the machine connects from, what it
/// runs on, what it must run and whether its agent applied it, and when its
/// certificate ends.
fn wide_cells(machine: &MachineView) -> [String; 7] {
    [
        machine.remote_address.clone().unwrap_or_default(),
        machine.os.clone(),
        machine.kernel.clone(),
        machine.arch.clone(),
        machine.desired_image.clone().unwrap_or_default(),
        format!(
            "{}/{}",
            machine.applied_desired_version, machine.desired_version
        ),
        machine
            .certificate_expires_at
            .clone()
            .unwrap_or_else(|| "never".into()),
    ]
}

/// `machines list`: a table of machines (`wide`: with [`WIDE_COLUMNS`]), or
/// all their views as JSON.
pub(super) fn print_machines(
    output: Output,
    wide: bool,
    machines: &[Machine],
) -> Result<(), CtlError> {
    let views: Vec<MachineView> = machines.iter().map(MachineView::from).collect();
    let mut headers = LIST_COLUMNS.to_vec();
    if wide {
        headers.extend(WIDE_COLUMNS);
    }
    print_list(output, &views, &headers, |machine| {
        let mut row = list_row(machine);
        if wide {
            row.extend(wide_cells(machine));
        }
        row
    })
}

#[derive(Debug, Serialize)]
struct EventView {
    machine_id: String,
    hostname: String,
    zone: String,
    labels: BTreeMap<String, String>,
    at: String,
    from: Option<String>,
    to: String,
    reason: String,
    snapshot: bool,
}

/// One event of `machines watch`: a line, or one JSON object per line.
pub(super) fn print_event(output: Output, event: &MachineEvent) -> Result<(), CtlError> {
    let transition = event.transition.clone().unwrap_or_default();
    let view = EventView {
        machine_id: event.machine_id.clone(),
        hostname: event.hostname.clone(),
        zone: event.zone.clone(),
        labels: event.labels.clone().into_iter().collect(),
        at: format_time(transition.at),
        from: (!transition.from.is_empty()).then(|| transition.from.clone()),
        to: transition.to.clone(),
        reason: transition.reason.clone(),
        snapshot: event.snapshot,
    };
    if output == Output::Json {
        // One object per line, so that scripts can read the stream as it comes.
        print_json_line(&view)?;
    } else {
        let change = match &view.from {
            Some(from) => format!("{from} -> {}", view.to),
            None => format!("is {}", view.to),
        };
        print_line!(
            "{}  {:<16} {:<8} {:<28} {}",
            view.at,
            view.hostname,
            view.zone,
            change,
            view.reason
        );
    }
    Ok(())
}

/// One machine in full (`machines show` and the answers of changes).
pub(super) fn print_machine(output: Output, machine: &Machine) -> Result<(), CtlError> {
    let view = MachineView::from(machine);
    if output == Output::Json {
        return print_json(&view);
    }
    let never = || "never".to_owned();
    let fields = [
        ("id", view.id.clone()),
        ("identity", view.identity.clone()),
        ("hostname", view.hostname.clone()),
        ("zone", view.zone.clone()),
        ("labels", format_labels(&view.labels)),
        ("connected", view.connected.to_string()),
        (
            "remote address",
            view.remote_address.clone().unwrap_or_default(),
        ),
        ("replica", view.replica.clone().unwrap_or_default()),
        ("last seen", view.last_seen.clone().unwrap_or_else(never)),
        ("agent version", view.agent_version.clone()),
        ("os", view.os.clone()),
        ("kernel", view.kernel.clone()),
        ("arch", view.arch.clone()),
        ("boot time", view.boot_time.clone().unwrap_or_else(never)),
        (
            "enrolled at",
            view.enrolled_at.clone().unwrap_or_else(never),
        ),
        (
            "certificate expires",
            view.certificate_expires_at.clone().unwrap_or_else(never),
        ),
        (
            "desired state",
            format!(
                "version {} (agent applied {})",
                view.desired_version, view.applied_desired_version
            ),
        ),
        (
            "decommissioned",
            view.retired_at.clone().unwrap_or_else(|| "no".to_owned()),
        ),
        (
            "quarantined",
            view.quarantine.as_ref().map_or_else(
                || "no".to_owned(),
                |quarantine| {
                    format!(
                        "since {} by {}: {}",
                        quarantine.since, quarantine.by, quarantine.reason
                    )
                },
            ),
        ),
    ];
    print_fields(FIELD_WIDTH, &fields);
    print_health_sections(&view);
    let none = || "none".to_owned();
    print_line!();
    print_line!("images:");
    print_line!(
        "  current            {}{}",
        view.current_image.clone().unwrap_or_else(none),
        view.current_image_created_at
            .as_ref()
            .map(|built| format!(" (built {built})"))
            .unwrap_or_default()
    );
    print_line!(
        "  previous           {}",
        view.previous_image.clone().unwrap_or_else(none)
    );
    print_line!(
        "  desired            {}",
        view.desired_image.clone().unwrap_or_else(none)
    );
    if let Some(swap) = &view.last_swap {
        print_line!(
            "  last swap          {} {} ({}): {}",
            swap.target.clone().unwrap_or_default(),
            swap.outcome,
            swap.step,
            swap.message
        );
    }
    Ok(())
}

/// State, checks, metrics and history of `machines show`.
fn print_health_sections(view: &MachineView) {
    print_fields(
        FIELD_WIDTH,
        &[(
            "state",
            format!(
                "{} since {} ({})",
                view.state,
                view.state_since.clone().unwrap_or_else(|| "never".into()),
                view.state_reason
            ),
        )],
    );
    if !view.checks.is_empty() {
        print_line!();
        print_line!("checks:");
        let rows: Vec<Vec<String>> = view
            .checks
            .iter()
            .map(|check| {
                vec![
                    check.name.clone(),
                    check.kind.clone(),
                    if check.critical { "critical" } else { "" }.to_owned(),
                    if check.healthy {
                        "healthy"
                    } else {
                        "UNHEALTHY"
                    }
                    .to_owned(),
                    format!(
                        "{} x{} ({} ms)",
                        if check.last_passed { "pass" } else { "fail" },
                        check.consecutive,
                        check.last_duration_ms
                    ),
                    check.target.clone(),
                ]
            })
            .collect();
        print_table(
            &["NAME", "KIND", "CRITICAL", "VERDICT", "LAST", "TARGET"],
            &rows,
        );
        for check in view
            .checks
            .iter()
            .filter(|check| !check.last_output.is_empty())
        {
            print_line!();
            print_line!(
                "output of {} (last run {}):",
                check.name,
                check.last_run_at.clone().unwrap_or_default()
            );
            for line in check.last_output.lines() {
                print_line!("  | {line}");
            }
        }
    }
    if let Some(metrics) = &view.metrics {
        print_line!();
        print_line!("metrics:");
        for disk in &metrics.disks {
            print_line!(
                "  disk {:<12} {:.1}% used ({} of {} bytes)",
                disk.mount,
                disk.used_percent,
                disk.used_bytes,
                disk.total_bytes
            );
        }
        print_line!(
            "  memory           {} of {} bytes available",
            metrics.memory_available_bytes,
            metrics.memory_total_bytes
        );
        print_line!(
            "  load             {:.2} {:.2} {:.2}",
            metrics.load1,
            metrics.load5,
            metrics.load15
        );
        print_line!("  uptime           {} s", metrics.uptime_seconds);
    }
    for breach in &view.metric_breaches {
        print_line!("  THRESHOLD EXCEEDED: {breach}");
    }
    if !view.transitions.is_empty() {
        print_line!();
        print_line!("history (newest first):");
        let rows: Vec<Vec<String>> = view
            .transitions
            .iter()
            .map(|transition| {
                vec![
                    transition.at.clone(),
                    format!("{} -> {}", transition.from, transition.to),
                    transition.reason.clone(),
                ]
            })
            .collect();
        print_table(&["TIME", "CHANGE", "REASON"], &rows);
    }
}
