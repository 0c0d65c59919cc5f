//! The `[remediation]` and `[[minimum]]` sections of `server.toml`: file types
//! (TOML, `deny_unknown_fields`) and their validation into typed settings,
//! every problem reported together with the others of the file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use flotte_proto::labels::{validate_label, Selector};
use flotte_proto::settings::parse_duration_field;
use serde::{Deserialize, Serialize};

fn default_true() -> bool {
    true
}
fn default_percent() -> u32 {
    50
}
fn default_max_concurrent() -> u32 {
    2
}
fn default_interval() -> String {
    "5s".into()
}
fn default_replacement_timeout() -> String {
    "30m".into()
}
fn default_provider_timeout() -> String {
    "5m".into()
}

/// `[remediation]`: automatic quarantine and replacement of machines that
/// stay down or unreachable, behind a breaker.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RemediationConfigFile {
    /// The breaker (on by default) stops automatic remediation when more than
    /// these shares of a zone or of the fleet are unhealthy.
    #[serde(default = "default_true")]
    pub breaker: bool,
    #[serde(default = "default_percent")]
    pub max_unhealthy_zone_percent: u32,
    #[serde(default = "default_percent")]
    pub max_unhealthy_fleet_percent: u32,
    /// At most this many remediations open at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// How often the controller decides.
    #[serde(default = "default_interval")]
    pub interval: String,
    /// A replacement not operational within this long fails the event.
    #[serde(default = "default_replacement_timeout")]
    pub replacement_timeout: String,
    #[serde(default, rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RemediationRuleFile>,
    #[serde(default, rename = "provider", skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderFile>,
}

impl RemediationConfigFile {
    pub fn is_default(&self) -> bool {
        *self == RemediationConfigFile::default()
    }
}

impl Default for RemediationConfigFile {
    fn default() -> Self {
        RemediationConfigFile {
            breaker: true,
            max_unhealthy_zone_percent: default_percent(),
            max_unhealthy_fleet_percent: default_percent(),
            max_concurrent: default_max_concurrent(),
            interval: default_interval(),
            replacement_timeout: default_replacement_timeout(),
            rules: Vec::new(),
            providers: Vec::new(),
        }
    }
}

/// `[[remediation.rule]]`: machines matching `selector`, `down` or
/// `unreachable` for longer than `after`, are replaced through `provider`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RemediationRuleFile {
    #[serde(default)]
    pub selector: String,
    pub after: String,
    pub provider: String,
}

/// `[[remediation.provider]]`: where replacements come from.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    pub name: String,
    /// `command` or `local`.
    pub kind: String,
    /// command: the executable (machine JSON on stdin, FLOTTE_JOIN_TOKEN in
    /// its environment) and its arguments.
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default = "default_provider_timeout")]
    pub timeout: String,
    /// local: the agent binary, the directory holding replacement agents'
    /// data dirs, the server address they dial, an optional agent config
    /// file, and extra agent arguments.
    pub agent_binary: Option<String>,
    pub base_dir: Option<String>,
    pub server: Option<String>,
    pub agent_config: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_args: Vec<String>,
}

/// `[[minimum]]`: the least number of operational machines a group (the
/// machines with `label = value`) needs to count as operational.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupMinimumFile {
    pub label: String,
    pub value: String,
    pub operational: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemediationRule {
    pub selector: Selector,
    pub selector_text: String,
    pub after: Duration,
    pub provider: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    Command {
        program: PathBuf,
        args: Vec<String>,
        timeout: Duration,
    },
    Local {
        agent_binary: PathBuf,
        base_dir: PathBuf,
        server: String,
        agent_config: Option<PathBuf>,
        agent_args: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSettings {
    pub name: String,
    pub kind: ProviderKind,
}

/// Validated `[remediation]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemediationSettings {
    pub breaker: bool,
    pub max_unhealthy_zone_percent: u32,
    pub max_unhealthy_fleet_percent: u32,
    pub max_concurrent: u32,
    pub interval: Duration,
    pub replacement_timeout: Duration,
    pub rules: Vec<RemediationRule>,
    pub providers: Vec<ProviderSettings>,
}

impl RemediationSettings {
    /// Whether anything is ever remediated automatically.
    pub fn enabled(&self) -> bool {
        !self.rules.is_empty()
    }
}

/// Declared minimums: label → value → operational machines needed.
pub type GroupMinimums = BTreeMap<String, BTreeMap<String, u32>>;

fn percent_problem(name: &str, value: u32, problems: &mut Vec<String>) {
    if value == 0 || value > 100 {
        problems.push(format!(
            "remediation.{name} = {value} must be between 1 and 100"
        ));
    }
}

impl ProviderFile {
    fn validate(&self, problems: &mut Vec<String>) -> Option<ProviderSettings> {
        let name = &self.name;
        if !flotte_proto::identity::is_valid_segment(name) {
            problems.push(format!(
                "remediation provider name {} {}",
                flotte_proto::names::quoted_prefix(name),
                flotte_proto::identity::SEGMENT_GRAMMAR
            ));
        }
        let mut missing = |field: &str, value: &Option<String>| -> Option<String> {
            match value {
                Some(text) if !text.trim().is_empty() => Some(text.clone()),
                _ => {
                    problems.push(format!(
                        "remediation provider {name:?} (kind {}) needs {field}",
                        self.kind
                    ));
                    None
                }
            }
        };
        let kind = match self.kind.as_str() {
            "command" => {
                let program = missing("command", &self.command);
                let timeout = parse_duration_field(
                    &format!("remediation provider {name:?}: timeout"),
                    &self.timeout,
                    Duration::from_secs(1),
                    problems,
                );
                ProviderKind::Command {
                    program: PathBuf::from(program?),
                    args: self.args.clone(),
                    timeout,
                }
            }
            "local" => {
                let agent_binary = missing("agent_binary", &self.agent_binary);
                let base_dir = missing("base_dir", &self.base_dir);
                let server = missing("server", &self.server);
                ProviderKind::Local {
                    agent_binary: PathBuf::from(agent_binary?),
                    base_dir: PathBuf::from(base_dir?),
                    server: server?,
                    agent_config: self.agent_config.as_ref().map(PathBuf::from),
                    agent_args: self.agent_args.clone(),
                }
            }
            other => {
                problems.push(format!(
                    "remediation provider {name:?}: kind {other:?} is not command or local"
                ));
                return None;
            }
        };
        Some(ProviderSettings {
            name: name.clone(),
            kind,
        })
    }
}

impl RemediationConfigFile {
    pub fn validate(&self, problems: &mut Vec<String>) -> RemediationSettings {
        percent_problem(
            "max_unhealthy_zone_percent",
            self.max_unhealthy_zone_percent,
            problems,
        );
        percent_problem(
            "max_unhealthy_fleet_percent",
            self.max_unhealthy_fleet_percent,
            problems,
        );
        if self.max_concurrent == 0 {
            problems.push("remediation.max_concurrent must be at least 1".to_owned());
        }
        let interval = parse_duration_field(
            "remediation.interval",
            &self.interval,
            Duration::from_millis(100),
            problems,
        );
        let replacement_timeout = parse_duration_field(
            "remediation.replacement_timeout",
            &self.replacement_timeout,
            Duration::from_secs(1),
            problems,
        );
        let providers: Vec<ProviderSettings> = self
            .providers
            .iter()
            .filter_map(|provider| provider.validate(problems))
            .collect();
        for (index, provider) in self.providers.iter().enumerate() {
            if self.providers[..index]
                .iter()
                .any(|earlier| earlier.name == provider.name)
            {
                problems.push(format!(
                    "remediation provider {:?} is defined twice",
                    provider.name
                ));
            }
        }
        let rules = self
            .rules
            .iter()
            .filter_map(|rule| {
                let selector = match Selector::parse(&rule.selector) {
                    Ok(selector) => Some(selector),
                    Err(error) => {
                        problems.push(format!(
                            "remediation rule selector {:?}: {error}",
                            rule.selector
                        ));
                        None
                    }
                };
                let after = parse_duration_field(
                    &format!("remediation rule {:?}: after", rule.selector),
                    &rule.after,
                    Duration::from_secs(1),
                    problems,
                );
                if !self
                    .providers
                    .iter()
                    .any(|provider| provider.name == rule.provider)
                {
                    problems.push(format!(
                        "remediation rule {:?} names provider {:?}, which is not defined",
                        rule.selector, rule.provider
                    ));
                }
                Some(RemediationRule {
                    selector: selector?,
                    selector_text: rule.selector.clone(),
                    after,
                    provider: rule.provider.clone(),
                })
            })
            .collect();
        RemediationSettings {
            breaker: self.breaker,
            max_unhealthy_zone_percent: self.max_unhealthy_zone_percent,
            max_unhealthy_fleet_percent: self.max_unhealthy_fleet_percent,
            max_concurrent: self.max_concurrent.max(1),
            interval,
            replacement_timeout,
            rules,
            providers,
        }
    }
}

/// Validates `[[minimum]]` tables.
pub fn validate_minimums(
    minimums: &[GroupMinimumFile],
    problems: &mut Vec<String>,
) -> GroupMinimums {
    let mut validated = GroupMinimums::new();
    for minimum in minimums {
        if let Err(error) = validate_label(&minimum.label, &minimum.value) {
            problems.push(format!("minimum: {error}"));
            continue;
        }
        let values = validated.entry(minimum.label.clone()).or_default();
        if values.contains_key(&minimum.value) {
            problems.push(format!(
                "minimum for {}={} is declared twice",
                minimum.label, minimum.value
            ));
        } else {
            values.insert(minimum.value.clone(), minimum.operational);
        }
    }
    validated
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_remediation_problem_is_reported_together() {
        let file: RemediationConfigFile = toml::from_str(
            r#"
max_unhealthy_zone_percent = 0
max_concurrent = 0
interval = "soon"
[[rule]]
selector = "role=web,,x y"
after = "never"
provider = "cloud"
[[provider]]
name = "local"
kind = "local"
agent_binary = "/usr/bin/flotte-agent"
[[provider]]
name = "vm"
kind = "hypervisor"
"#,
        )
        .unwrap();
        let mut problems = Vec::new();
        file.validate(&mut problems);
        let all = problems.join("\n");
        for expected in [
            "max_unhealthy_zone_percent = 0",
            "max_concurrent must be at least 1",
            "remediation.interval = \"soon\"",
            "selector \"role=web,,x y\"",
            "after = \"never\"",
            "provider \"cloud\", which is not defined",
            "needs base_dir",
            "needs server",
            "kind \"hypervisor\" is not command or local",
        ] {
            assert!(all.contains(expected), "{expected} missing from:\n{all}");
        }
    }

    #[test]
    fn defaults_turn_the_breaker_on_at_half_of_a_zone() {
        let file: RemediationConfigFile = toml::from_str("").unwrap();
        let mut problems = Vec::new();
        let settings = file.validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(settings.breaker);
        assert_eq!(settings.max_unhealthy_zone_percent, 50);
        assert!(!settings.enabled());
    }

    #[test]
    fn minimums_are_checked_and_unique() {
        let mut problems = Vec::new();
        let minimums = validate_minimums(
            &[
                GroupMinimumFile {
                    label: "role".into(),
                    value: "web".into(),
                    operational: 2,
                },
                GroupMinimumFile {
                    label: "role".into(),
                    value: "web".into(),
                    operational: 3,
                },
                GroupMinimumFile {
                    label: "bad key".into(),
                    value: "x".into(),
                    operational: 1,
                },
            ],
            &mut problems,
        );
        assert_eq!(minimums["role"]["web"], 2);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
