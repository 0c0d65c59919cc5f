//! What a new rollout must be forced past (`rollout create --force`): a
//! rollout that would take machines to an older version of their image, or
//! one whose every machine is unreachable (it would wait, doing nothing,
//! until they return). Both are legitimate on purpose and surprising by
//! mistake, so the operator says which with `--force`.
//!
//! Pure: it decides over the rollout's machines as creation sees them; the
//! refusal and the audit of a forced start belong to the caller.

use crate::domain::health::MachineState;
use crate::store::DesiredImageRecord;

use super::downgrade_from;

/// Machines named in a reason at most (the count says the rest).
const MACHINES_NAMED: usize = 5;

/// One machine of a rollout being created, as preflight needs it.
#[derive(Debug, Clone, Copy)]
pub struct PreflightMachine<'a> {
    pub hostname: &'a str,
    /// What it runs now (else was told to run): see `previous_image`.
    pub running: Option<&'a DesiredImageRecord>,
    /// Its health state name (`MachineState::as_str`).
    pub state: &'a str,
}

/// Why a rollout needs `--force`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForceReason {
    /// These machines (hostname and what they run) would go to an older
    /// version; `of` machines in the rollout.
    Downgrade {
        machines: Vec<(String, String)>,
        of: usize,
    },
    /// Every one of the rollout's machines is unreachable.
    AllUnreachable { machines: usize },
}

impl std::fmt::Display for ForceReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForceReason::Downgrade { machines, of } => {
                let named: Vec<String> = machines
                    .iter()
                    .take(MACHINES_NAMED)
                    .map(|(hostname, running)| format!("{hostname} runs {running}"))
                    .collect();
                let more = machines.len().saturating_sub(MACHINES_NAMED);
                write!(
                    f,
                    "a downgrade for {} of {of} machines ({}{})",
                    machines.len(),
                    named.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                )
            }
            ForceReason::AllUnreachable { machines } => write!(
                f,
                "all {machines} of its machines are unreachable: it would wait until they return"
            ),
        }
    }
}

/// The reasons a rollout of `name@version` over `machines` needs `--force`
/// (none: it may start as asked).
pub fn reasons_to_force(
    name: &str,
    version: &semver::Version,
    machines: &[PreflightMachine<'_>],
) -> Vec<ForceReason> {
    let mut reasons = Vec::new();
    let downgraded: Vec<(String, String)> = machines
        .iter()
        .filter_map(|machine| {
            downgrade_from(machine.running, name, version)
                .map(|running| (machine.hostname.to_owned(), running))
        })
        .collect();
    if !downgraded.is_empty() {
        reasons.push(ForceReason::Downgrade {
            machines: downgraded,
            of: machines.len(),
        });
    }
    let unreachable = MachineState::Unreachable.as_str();
    if !machines.is_empty() && machines.iter().all(|machine| machine.state == unreachable) {
        reasons.push(ForceReason::AllUnreachable {
            machines: machines.len(),
        });
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(version: &str) -> DesiredImageRecord {
        DesiredImageRecord {
            name: "app".into(),
            version: version.into(),
            digest: "d".into(),
            rollback: false,
        }
    }

    #[test]
    fn downgrades_and_an_unreachable_fleet_need_force() {
        let v1 = image("1.0.0");
        let v2 = image("2.0.0");
        let other = DesiredImageRecord {
            name: "db".into(),
            ..image("9.0.0")
        };
        let machine = |hostname, running, state| PreflightMachine {
            hostname,
            running,
            state,
        };
        let version = semver::Version::new(1, 5, 0);
        let downgrade = |machines: &[(&str, &str)], of| ForceReason::Downgrade {
            machines: machines
                .iter()
                .map(|(host, running)| ((*host).to_owned(), (*running).to_owned()))
                .collect(),
            of,
        };
        let cases: Vec<(&str, Vec<PreflightMachine>, Vec<ForceReason>)> = vec![
            (
                "an upgrade of reachable machines",
                vec![
                    machine("a", Some(&v1), "operational"),
                    machine("b", None, "down"),
                ],
                vec![],
            ),
            (
                "one machine on a newer version",
                vec![
                    machine("a", Some(&v1), "operational"),
                    machine("b", Some(&v2), "operational"),
                ],
                vec![downgrade(&[("b", "app@2.0.0")], 2)],
            ),
            (
                "another image's newer version is no downgrade",
                vec![machine("a", Some(&other), "operational")],
                vec![],
            ),
            (
                "every machine unreachable",
                vec![
                    machine("a", Some(&v1), "unreachable"),
                    machine("b", None, "unreachable"),
                ],
                vec![ForceReason::AllUnreachable { machines: 2 }],
            ),
            (
                "one reachable machine is enough",
                vec![
                    machine("a", Some(&v1), "unreachable"),
                    machine("b", None, "unknown"),
                ],
                vec![],
            ),
            (
                "both at once",
                vec![machine("a", Some(&v2), "unreachable")],
                vec![
                    downgrade(&[("a", "app@2.0.0")], 1),
                    ForceReason::AllUnreachable { machines: 1 },
                ],
            ),
            ("no machines", vec![], vec![]),
        ];
        for (name, machines, expected) in cases {
            assert_eq!(
                reasons_to_force("app", &version, &machines),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn reasons_name_a_few_machines_and_count_the_rest() {
        let machines: Vec<(String, String)> = (1..=7)
            .map(|index| (format!("web-{index}"), "app@2.0.0".to_owned()))
            .collect();
        let text = ForceReason::Downgrade { machines, of: 9 }.to_string();
        assert_eq!(
            text,
            "a downgrade for 7 of 9 machines (web-1 runs app@2.0.0, web-2 runs app@2.0.0, \
             web-3 runs app@2.0.0, web-4 runs app@2.0.0, web-5 runs app@2.0.0 and 2 more)"
        );
        assert_eq!(
            ForceReason::AllUnreachable { machines: 3 }.to_string(),
            "all 3 of its machines are unreachable: it would wait until they return"
        );
    }
}
