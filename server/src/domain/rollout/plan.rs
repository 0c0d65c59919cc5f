//! The rollout plan file: stages and a failure policy, typed and validated
//! with every problem listed together.
//!
//! ```toml
//! [[stage]]
//! name = "canary"
//! selector = "env=prod"
//! batch = 1                  # or "25%" of the stage's machines
//! bake = "10m"
//! approval = false
//! max_unavailable_per_zone = 1
//!
//! [policy]
//! max_failures = "5%"        # or a count
//! machine_deadline = "10m"
//! on_failure = "rollback"    # or "halt"
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use flotte_proto::labels::Selector;
use flotte_proto::settings::parse_duration_field;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the plan is not valid TOML: {0}")]
    Parse(String),
    #[error("invalid plan:\n{}", .0.iter().map(|problem| format!("  - {problem}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

/// A count of machines or a percentage of a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    /// The number of machines this amount means out of `whole`: a
    /// percentage rounds up and is never less than one machine.
    pub fn of(self, whole: usize) -> usize {
        match self {
            Amount::Count(count) => count as usize,
            Amount::Percent(percent) => (whole * percent as usize).div_ceil(100).max(1),
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Count(count) => write!(f, "{count}"),
            Amount::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Revert the machines already updated to the image they ran before.
    Rollback,
    /// Stop where it is.
    Halt,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    /// Selector text (`env=prod,role=web`; empty: every machine).
    pub selector: String,
    /// Machines per wave.
    pub batch: Amount,
    pub bake_seconds: u64,
    /// Waits for `rollout approve` before its first wave.
    pub approval: bool,
    pub max_unavailable_per_zone: Option<u32>,
}

impl Stage {
    /// The parsed selector (validated when the plan was).
    pub fn selector(&self) -> Selector {
        Selector::parse(&self.selector).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub max_failures: Amount,
    pub machine_deadline_seconds: u64,
    pub on_failure: OnFailure,
    /// Set (never by the plan file) when the operator forced a downgrade at
    /// creation: machines are told the lower version is wanted on purpose.
    /// Stored with the plan; older stored plans read as `false`.
    #[serde(default)]
    pub allows_downgrade: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub stages: Vec<Stage>,
    pub policy: Policy,
}

/// A count (`1`) or a percentage (`"25%"`) as written in the file.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AmountFile {
    Count(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    name: String,
    #[serde(default)]
    selector: String,
    #[serde(default)]
    batch: Option<AmountFile>,
    #[serde(default)]
    bake: Option<String>,
    #[serde(default)]
    approval: bool,
    #[serde(default)]
    max_unavailable_per_zone: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    max_failures: Option<AmountFile>,
    #[serde(default)]
    machine_deadline: Option<String>,
    #[serde(default)]
    on_failure: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default, rename = "stage")]
    stages: Vec<StageFile>,
    #[serde(default)]
    policy: PolicyFile,
}

const DEFAULT_MACHINE_DEADLINE: &str = "10m";

fn parse_amount(field: &str, amount: &AmountFile, problems: &mut Vec<String>) -> Amount {
    match amount {
        AmountFile::Count(count) => match u32::try_from(*count) {
            Ok(count) if count >= 1 => Amount::Count(count),
            _ => {
                problems.push(format!("{field} = {count} must be at least 1"));
                Amount::Count(1)
            }
        },
        AmountFile::Text(text) => {
            let trimmed = text.trim();
            let parsed = match trimmed.strip_suffix('%') {
                Some(number) => number.trim().parse::<u32>().ok().map(Amount::Percent),
                None => trimmed.parse::<u32>().ok().map(Amount::Count),
            };
            match parsed {
                Some(Amount::Percent(percent)) if (1..=100).contains(&percent) => {
                    Amount::Percent(percent)
                }
                Some(Amount::Count(count)) if count >= 1 => Amount::Count(count),
                Some(Amount::Percent(_)) => {
                    problems.push(format!(
                        "{field} = {text:?}: a percentage must be between 1% and 100%"
                    ));
                    Amount::Percent(100)
                }
                _ => {
                    problems.push(format!(
                        "{field} = {text:?} is neither a count (1) nor a percentage (\"25%\")"
                    ));
                    Amount::Count(1)
                }
            }
        }
    }
}

fn seconds(duration: Duration) -> u64 {
    duration.as_secs()
}

/// Parses and validates a plan; every problem is reported together.
pub fn parse_plan(text: &str) -> Result<Plan, PlanError> {
    let file: PlanFile =
        toml::from_str(text).map_err(|error| PlanError::Parse(error.to_string()))?;
    let mut problems = Vec::new();
    if file.stages.is_empty() {
        problems.push("the plan has no [[stage]]".to_owned());
    }
    let mut names = BTreeSet::new();
    let mut stages = Vec::new();
    for (index, stage) in file.stages.iter().enumerate() {
        let label = if stage.name.trim().is_empty() {
            problems.push(format!("stage {} has an empty name", index + 1));
            format!("stage {}", index + 1)
        } else {
            format!("stage {:?}", stage.name)
        };
        if !stage.name.trim().is_empty() && !names.insert(stage.name.clone()) {
            problems.push(format!("{label}: the name is used twice"));
        }
        if let Err(error) = Selector::parse(&stage.selector) {
            problems.push(format!("{label}: selector {:?}: {error}", stage.selector));
        }
        let batch = stage.batch.as_ref().map_or(Amount::Percent(100), |batch| {
            parse_amount(&format!("{label}: batch"), batch, &mut problems)
        });
        let bake = stage.bake.as_deref().map_or(Duration::ZERO, |bake| {
            parse_duration_field(
                &format!("{label}: bake"),
                bake,
                Duration::ZERO,
                &mut problems,
            )
        });
        let max_unavailable_per_zone = match stage.max_unavailable_per_zone {
            None => None,
            Some(value) => match u32::try_from(value) {
                Ok(value) if value >= 1 => Some(value),
                _ => {
                    problems.push(format!(
                        "{label}: max_unavailable_per_zone = {value} must be at least 1"
                    ));
                    None
                }
            },
        };
        stages.push(Stage {
            name: stage.name.clone(),
            selector: stage.selector.clone(),
            batch,
            bake_seconds: seconds(bake),
            approval: stage.approval,
            max_unavailable_per_zone,
        });
    }
    let max_failures = file
        .policy
        .max_failures
        .as_ref()
        .map_or(Amount::Count(1), |amount| {
            parse_amount("policy.max_failures", amount, &mut problems)
        });
    let machine_deadline = parse_duration_field(
        "policy.machine_deadline",
        file.policy
            .machine_deadline
            .as_deref()
            .unwrap_or(DEFAULT_MACHINE_DEADLINE),
        Duration::from_secs(1),
        &mut problems,
    );
    let on_failure = match file.policy.on_failure.as_deref() {
        None | Some("halt") => OnFailure::Halt,
        Some("rollback") => OnFailure::Rollback,
        Some(other) => {
            problems.push(format!(
                "policy.on_failure = {other:?}: expected \"rollback\" or \"halt\""
            ));
            OnFailure::Halt
        }
    };
    if !problems.is_empty() {
        return Err(PlanError::Invalid(problems));
    }
    Ok(Plan {
        stages,
        policy: Policy {
            max_failures,
            machine_deadline_seconds: seconds(machine_deadline),
            on_failure,
            allows_downgrade: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example users start from (`examples/plan.toml`, also what
    /// `flottectl rollout plan-init` writes) is a valid plan.
    #[test]
    fn the_committed_example_plan_parses() {
        let plan = parse_plan(include_str!("../../../../examples/plan.toml")).unwrap();
        let names: Vec<&str> = plan
            .stages
            .iter()
            .map(|stage| stage.name.as_str())
            .collect();
        assert_eq!(names, ["qualification", "canary", "production"]);
        assert!(plan.stages[0].approval);
        assert_eq!(plan.policy.on_failure, OnFailure::Rollback);
    }

    #[test]
    fn the_design_example_parses() {
        let plan = parse_plan(
            r#"
[[stage]]
name = "qualification"
selector = "env=qualification"
batch = "100%"
bake = "5m"
approval = true

[[stage]]
name = "canary"
selector = "env=prod"
batch = 1
bake = "10m"

[[stage]]
name = "prod"
selector = "env=prod"
batch = "25%"
max_unavailable_per_zone = 1
bake = "10m"

[policy]
max_failures = "5%"
machine_deadline = "10m"
on_failure = "rollback"
"#,
        )
        .unwrap();
        assert_eq!(plan.stages.len(), 3);
        assert!(plan.stages[0].approval);
        assert_eq!(plan.stages[0].bake_seconds, 300);
        assert_eq!(plan.stages[1].batch, Amount::Count(1));
        assert_eq!(plan.stages[2].batch, Amount::Percent(25));
        assert_eq!(plan.stages[2].max_unavailable_per_zone, Some(1));
        assert_eq!(plan.policy.max_failures, Amount::Percent(5));
        assert_eq!(plan.policy.machine_deadline_seconds, 600);
        assert_eq!(plan.policy.on_failure, OnFailure::Rollback);
    }

    #[test]
    fn every_problem_is_listed_together() {
        let error = parse_plan(
            r#"
[[stage]]
name = "a"
selector = "env prod"
batch = 0
bake = "soon"
max_unavailable_per_zone = 0

[[stage]]
name = "a"
batch = "150%"

[[stage]]
name = ""
batch = "many"

[policy]
max_failures = -1
machine_deadline = "0s"
on_failure = "panic"
"#,
        )
        .unwrap_err();
        let PlanError::Invalid(problems) = error else {
            panic!("{error}")
        };
        let expected = [
            "stage \"a\": selector \"env prod\"",
            "stage \"a\": batch = 0 must be at least 1",
            "stage \"a\": bake = \"soon\" is not a duration",
            "max_unavailable_per_zone = 0 must be at least 1",
            "stage \"a\": the name is used twice",
            "batch = \"150%\": a percentage must be between 1% and 100%",
            "stage 3 has an empty name",
            "stage 3: batch = \"many\" is neither a count",
            "policy.max_failures = -1 must be at least 1",
            "policy.machine_deadline = \"0s\" is too short",
            "policy.on_failure = \"panic\"",
        ];
        for needle in expected {
            assert!(
                problems.iter().any(|problem| problem.contains(needle)),
                "{needle:?} missing from {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    }

    #[test]
    fn unknown_fields_and_empty_plans_are_refused() {
        let unknown = parse_plan("[[stage]]\nname = \"a\"\nbatchh = 1\n").unwrap_err();
        assert!(unknown.to_string().contains("batchh"), "{unknown}");
        let empty = parse_plan("").unwrap_err();
        assert!(empty.to_string().contains("no [[stage]]"), "{empty}");
    }

    #[test]
    fn amounts_resolve_rounding_up_and_never_to_zero() {
        assert_eq!(Amount::Percent(25).of(10), 3);
        assert_eq!(Amount::Percent(5).of(6), 1);
        assert_eq!(Amount::Percent(100).of(7), 7);
        assert_eq!(Amount::Percent(50).of(0), 1);
        assert_eq!(Amount::Count(4).of(2), 4);
    }
}
