//! What a webhook receives, per its `format`: the generic JSON (the alert's
//! `kind` and fields, unchanged), a Slack-compatible message (`text` and
//! `blocks`) or an Alertmanager-compatible array (what `POST /api/v2/alerts`
//! accepts: `labels`, `annotations`, `startsAt`, `endsAt`, `generatorURL`).
//!
//! Values that come from machines (hostnames, zones, reasons, details) are
//! hostile: every one is cut to a bound and stripped of control characters,
//! and in Slack text `&`, `<` and `>` are escaped so that a hostname cannot
//! mention `@channel` or draw a link.

use std::time::SystemTime;

use serde_json::{json, Value};

use crate::alerts::Alert;

/// Characters kept of a label value (hostname, zone, rollout id…).
const MAX_LABEL_CHARS: usize = 128;
/// Characters kept of a summary or description.
const MAX_TEXT_CHARS: usize = 1024;

/// The body format of one webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebhookFormat {
    #[default]
    Generic,
    Slack,
    Alertmanager,
}

impl WebhookFormat {
    pub const NAMES: &'static str = "generic, slack or alertmanager";

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "generic" => Some(WebhookFormat::Generic),
            "slack" => Some(WebhookFormat::Slack),
            "alertmanager" => Some(WebhookFormat::Alertmanager),
            _ => None,
        }
    }
}

/// At most `limit` characters of `value`, control characters dropped, `…`
/// when cut.
fn bounded(value: &str, limit: usize) -> String {
    let mut characters = value.chars().filter(|character| !character.is_control());
    let mut kept: String = characters.by_ref().take(limit).collect();
    if characters.next().is_some() {
        kept.push('…');
    }
    kept
}

fn field<'a>(alert: &'a Alert, name: &str) -> &'a str {
    alert.event.get(name).and_then(Value::as_str).unwrap_or("")
}

fn label(alert: &Alert, name: &str) -> String {
    bounded(field(alert, name), MAX_LABEL_CHARS)
}

/// How bad an alert is; `None` when it says things are fine again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Severity {
    Critical,
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
        }
    }
}

/// One alert in words and labels, whatever the format.
#[derive(Debug, Clone, PartialEq)]
struct Described {
    alertname: &'static str,
    /// `None`: the condition is over (resolved).
    severity: Option<Severity>,
    /// The severities this alert can have: each is sent, firing or resolved.
    possible: &'static [Severity],
    /// Labels besides alertname and severity.
    labels: Vec<(&'static str, String)>,
    summary: String,
    description: String,
}

fn describe(alert: &Alert) -> Described {
    let hostname = label(alert, "hostname");
    match alert.kind {
        "machine_state" => {
            let to = label(alert, "to");
            let severity = match to.as_str() {
                "down" | "unreachable" => Some(Severity::Critical),
                "degraded" => Some(Severity::Warning),
                _ => None,
            };
            Described {
                alertname: "FlotteMachineUnhealthy",
                severity,
                possible: &[Severity::Critical, Severity::Warning],

                labels: vec![
                    ("machine", hostname.clone()),
                    ("zone", label(alert, "zone")),
                ],
                summary: format!("Machine {hostname} is {to}"),
                description: format!(
                    "{hostname} went from {} to {to}: {}",
                    label(alert, "from"),
                    field(alert, "reason")
                ),
            }
        }
        "rollout" => {
            let state = label(alert, "state");
            let severity = match state.as_str() {
                "failed" => Some(Severity::Critical),
                "paused" | "rolling_back" | "rolled_back" => Some(Severity::Warning),
                _ => None,
            };
            let rollout = label(alert, "rollout");
            Described {
                alertname: "FlotteRollout",
                severity,
                possible: &[Severity::Critical, Severity::Warning],

                labels: vec![("rollout", rollout.clone())],
                summary: format!(
                    "Rollout {rollout} of {}: {} ({state})",
                    label(alert, "image"),
                    label(alert, "action")
                ),
                description: format!(
                    "wave {} of {}, by {}: {}",
                    alert.event.get("wave").unwrap_or(&Value::Null),
                    alert.event.get("waves").unwrap_or(&Value::Null),
                    label(alert, "actor"),
                    field(alert, "detail")
                ),
            }
        }
        "remediation_breaker" => {
            let open = alert.event.get("open").and_then(Value::as_bool) == Some(true);
            let reasons: Vec<&str> = alert
                .event
                .get("reasons")
                .and_then(Value::as_array)
                .map(|reasons| reasons.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            Described {
                alertname: "FlotteRemediationBreakerOpen",
                severity: open.then_some(Severity::Critical),
                possible: &[Severity::Critical],
                labels: Vec::new(),
                summary: if open {
                    "Remediation breaker open: automatic remediation stopped".to_owned()
                } else {
                    "Remediation breaker closed: automatic remediation resumes".to_owned()
                },
                description: reasons.join("; "),
            }
        }
        "remediation" => {
            let state = label(alert, "state");
            Described {
                alertname: "FlotteRemediation",
                severity: (state != "closed").then_some(Severity::Warning),
                possible: &[Severity::Warning],
                labels: vec![
                    ("machine", hostname.clone()),
                    ("zone", label(alert, "zone")),
                ],
                summary: format!("Remediation of {hostname}: {state}"),
                description: format!("{} {}", field(alert, "reason"), field(alert, "detail")),
            }
        }
        other => Described {
            alertname: "FlotteEvent",
            severity: Some(Severity::Warning),
            possible: &[Severity::Warning],
            labels: vec![("kind", bounded(other, MAX_LABEL_CHARS))],
            summary: format!("Flotte event {other}"),
            description: alert.event.to_string(),
        },
    }
}

/// `&`, `<` and `>` as Slack wants them in text (its only control characters).
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The JSON body of `alert`, raised at `at`, in `format`.
pub fn payload(
    format: WebhookFormat,
    alert: &Alert,
    at: SystemTime,
    generator_url: Option<&str>,
) -> Value {
    if format == WebhookFormat::Generic {
        return serde_json::to_value(alert).unwrap_or(Value::Null);
    }
    let described = describe(alert);
    let summary = bounded(&described.summary, MAX_TEXT_CHARS);
    let description = bounded(&described.description, MAX_TEXT_CHARS);
    match format {
        WebhookFormat::Generic | WebhookFormat::Slack => {
            let status = match described.severity {
                Some(severity) => severity.as_str(),
                None => "resolved",
            };
            let context: Vec<String> = described
                .labels
                .iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(name, value)| format!("{name}: {}", slack_escape(value)))
                .chain([format!("at {}", rfc3339(at))])
                .collect();
            json!({
                "text": format!("[{status}] {}", slack_escape(&summary)),
                "blocks": [
                    {
                        "type": "section",
                        "text": {
                            "type": "mrkdwn",
                            "text": format!("*[{status}] {}*\n{}", slack_escape(&summary), slack_escape(&description)),
                        },
                    },
                    {
                        "type": "context",
                        "elements": [{ "type": "mrkdwn", "text": context.join(" · ") }],
                    },
                ],
            })
        }
        WebhookFormat::Alertmanager => {
            // An alert whose condition is over is sent resolved (endsAt = now);
            // a machine's other severity is resolved at once, so that a
            // degraded machine going down leaves no stale warning firing.
            let alerts: Vec<Value> = described
                .possible
                .iter()
                .map(|severity| {
                    let firing = described.severity == Some(*severity);
                    let mut labels = serde_json::Map::new();
                    labels.insert("alertname".into(), json!(described.alertname));
                    labels.insert("severity".into(), json!(severity.as_str()));
                    for (name, value) in &described.labels {
                        labels.insert((*name).into(), json!(value));
                    }
                    let mut entry = json!({
                        "labels": labels,
                        "annotations": { "summary": summary, "description": description },
                        "startsAt": rfc3339(at),
                    });
                    if !firing {
                        entry["endsAt"] = json!(rfc3339(at));
                    }
                    if let Some(url) = generator_url {
                        entry["generatorURL"] = json!(url);
                    }
                    entry
                })
                .collect();
            Value::Array(alerts)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine_alert(hostname: &str, to: &str) -> Alert {
        Alert {
            kind: "machine_state",
            event: json!({
                "machine": "5b0c…",
                "hostname": hostname,
                "zone": "dc1",
                "labels": {},
                "from": "operational",
                "to": to,
                "reason": "critical check web failing",
                "time": "2026-11-30T22:00:00Z",
            }),
        }
    }

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn the_generic_format_is_the_alert_unchanged() {
        let alert = machine_alert("web-1", "down");
        let body = payload(WebhookFormat::Generic, &alert, at(), None);
        assert_eq!(body["kind"], "machine_state");
        assert_eq!(body["hostname"], "web-1");
        assert_eq!(body["reason"], "critical check web failing");
    }

    #[test]
    fn alertmanager_gets_labels_annotations_and_times_and_resolves_the_other_severity() {
        let body = payload(
            WebhookFormat::Alertmanager,
            &machine_alert("web-1", "down"),
            at(),
            Some("https://flotte.example/"),
        );
        let alerts = body.as_array().unwrap();
        assert_eq!(alerts.len(), 2, "{body:#}");
        let critical = &alerts[0];
        assert_eq!(critical["labels"]["alertname"], "FlotteMachineUnhealthy");
        assert_eq!(critical["labels"]["severity"], "critical");
        assert_eq!(critical["labels"]["machine"], "web-1");
        assert_eq!(critical["labels"]["zone"], "dc1");
        assert_eq!(critical["annotations"]["summary"], "Machine web-1 is down");
        assert!(critical["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains("critical check web failing"));
        assert_eq!(critical["startsAt"], "2027-01-15T08:00:00Z");
        assert!(critical.get("endsAt").is_none(), "{critical}");
        assert_eq!(critical["generatorURL"], "https://flotte.example/");
        let warning = &alerts[1];
        assert_eq!(warning["labels"]["severity"], "warning");
        assert_eq!(warning["endsAt"], "2027-01-15T08:00:00Z");
        let recovered = payload(
            WebhookFormat::Alertmanager,
            &machine_alert("web-1", "operational"),
            at(),
            None,
        );
        assert!(recovered
            .as_array()
            .unwrap()
            .iter()
            .all(|alert| alert.get("endsAt").is_some() && alert.get("generatorURL").is_none()));
    }

    #[test]
    fn a_breaker_is_one_alert_firing_then_resolved() {
        let breaker = |open: bool| Alert {
            kind: "remediation_breaker",
            event: json!({ "open": open, "reasons": ["zone dc1: 2 of 2 machines unhealthy (100% > 50%)"] }),
        };
        let opened = payload(WebhookFormat::Alertmanager, &breaker(true), at(), None);
        assert_eq!(opened.as_array().unwrap().len(), 1, "{opened:#}");
        assert_eq!(
            opened[0]["labels"]["alertname"],
            "FlotteRemediationBreakerOpen"
        );
        assert!(opened[0].get("endsAt").is_none());
        let closed = payload(WebhookFormat::Alertmanager, &breaker(false), at(), None);
        assert_eq!(closed.as_array().unwrap().len(), 1, "{closed:#}");
        assert!(closed[0].get("endsAt").is_some());
    }

    #[test]
    fn hostile_machine_values_are_bounded_and_escaped() {
        let hostile = format!("<!channel>&\u{1b}[31m{}", "x".repeat(5000));
        let alert = machine_alert(&hostile, "down");
        let slack = payload(WebhookFormat::Slack, &alert, at(), None);
        let text = slack["text"].as_str().unwrap();
        assert!(
            text.starts_with("[critical] Machine &lt;!channel&gt;&amp;[31m"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(
            text.chars().count() < MAX_LABEL_CHARS + 64,
            "{}",
            text.len()
        );
        let section = slack["blocks"][0]["text"]["text"].as_str().unwrap();
        assert!(!section.contains("<!channel>"), "{section}");
        let manager = payload(WebhookFormat::Alertmanager, &alert, at(), None);
        let machine = manager[0]["labels"]["machine"].as_str().unwrap();
        assert_eq!(
            machine.chars().count(),
            MAX_LABEL_CHARS + 1,
            "cut with an ellipsis"
        );
        assert!(!machine.contains('\u{1b}'));
    }

    #[test]
    fn formats_are_named_in_the_config() {
        assert_eq!(WebhookFormat::parse("slack"), Some(WebhookFormat::Slack));
        assert_eq!(
            WebhookFormat::parse("alertmanager"),
            Some(WebhookFormat::Alertmanager)
        );
        assert_eq!(
            WebhookFormat::parse("generic"),
            Some(WebhookFormat::Generic)
        );
        assert_eq!(WebhookFormat::parse("pagerduty"), None);
    }
}
