//! Automatic remediation, decided by one pure function over stored state:
//! which machines to quarantine and replace, which events to close or fail,
//! and whether the breaker is open. The loop in `controller` applies the
//! actions; nothing here does I/O or reads a clock.
//!
//! The breaker exists because a partition looks exactly like many sick
//! machines: when more than a configured share of a zone (or of the fleet)
//! is unhealthy, replacing them would double the zone when the network
//! heals, so nothing is remediated until the share falls again.

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

use crate::domain::health::MachineState;
use crate::domain::repair::settings::RemediationSettings;
use crate::store::repair::{RemediationEventRecord, RemediationState};
use crate::store::UnixSeconds;

/// What the decision needs to know of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineView {
    pub id: Uuid,
    pub hostname: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub state: MachineState,
    /// Since when the machine is in `state`.
    pub since: UnixSeconds,
    pub quarantined: bool,
    pub retired: bool,
    /// Id of the join token it enrolled with (links a replacement to its event).
    pub enrolled_with_token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Quarantine the machine and ask `provider` for a replacement.
    Remediate {
        machine_id: Uuid,
        provider: String,
        reason: String,
    },
    /// The replacement is operational with the same labels and zone.
    Close { event_id: String, replacement: Uuid },
    /// No operational replacement in time.
    Fail { event_id: String, reason: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BreakerVerdict {
    pub open: bool,
    /// Which zone (or the fleet) is over its share, and by how much.
    pub reasons: Vec<String>,
    /// The zones over their share (for the per-zone gauge).
    pub zones_over_share: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub actions: Vec<Action>,
    pub breaker: BreakerVerdict,
    /// Events still open after the actions.
    pub in_progress: u32,
}

fn unhealthy_state(state: MachineState) -> bool {
    matches!(state, MachineState::Down | MachineState::Unreachable)
}

/// Whether `unhealthy` of `total` is more than `percent` %.
fn over_share(unhealthy: usize, total: usize, percent: u32) -> bool {
    total > 0 && unhealthy * 100 > total * percent as usize
}

/// The breaker over the machines that count: in service or being remediated
/// (a machine quarantined whose event is over is set aside, its replacement
/// counts instead).
pub fn breaker(
    machines: &[MachineView],
    remediating: &BTreeSet<Uuid>,
    policy: &RemediationSettings,
) -> BreakerVerdict {
    if !policy.breaker {
        return BreakerVerdict::default();
    }
    let counted: Vec<(&MachineView, bool)> = machines
        .iter()
        .filter(|machine| !machine.retired)
        .filter(|machine| !machine.quarantined || remediating.contains(&machine.id))
        .map(|machine| {
            let unhealthy = unhealthy_state(machine.state) || remediating.contains(&machine.id);
            (machine, unhealthy)
        })
        .collect();
    let mut zones: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (machine, unhealthy) in &counted {
        let entry = zones.entry(&machine.zone).or_default();
        entry.0 += usize::from(*unhealthy);
        entry.1 += 1;
    }
    let mut reasons = Vec::new();
    let mut zones_over_share = Vec::new();
    let describe = |scope: String, unhealthy: usize, total: usize, limit: u32| {
        format!(
            "{scope}: {unhealthy} of {total} machines unhealthy ({}% > {limit}%)",
            unhealthy * 100 / total.max(1)
        )
    };
    for (zone, (unhealthy, total)) in zones {
        if over_share(unhealthy, total, policy.max_unhealthy_zone_percent) {
            zones_over_share.push(zone.to_owned());
            reasons.push(describe(
                format!("zone {zone}"),
                unhealthy,
                total,
                policy.max_unhealthy_zone_percent,
            ));
        }
    }
    let unhealthy = counted.iter().filter(|(_, unhealthy)| *unhealthy).count();
    if over_share(unhealthy, counted.len(), policy.max_unhealthy_fleet_percent) {
        reasons.push(describe(
            "fleet".to_owned(),
            unhealthy,
            counted.len(),
            policy.max_unhealthy_fleet_percent,
        ));
    }
    BreakerVerdict {
        open: !reasons.is_empty(),
        reasons,
        zones_over_share,
    }
}

/// Whether `replacement` is the operational replacement `event` waits for.
fn replaces(event: &RemediationEventRecord, replacement: &MachineView) -> bool {
    !event.token_id.is_empty()
        && replacement.enrolled_with_token == event.token_id
        && !replacement.retired
        && replacement.id != event.machine_id
        && replacement.state == MachineState::Operational
        && replacement.zone == event.zone
        && replacement.labels == event.labels
}

/// Decides what automatic remediation does now.
///
/// `settled_since` is when the decider last saw the breaker open (or began
/// to decide at all): a machine's unhealthiness only counts from then. A
/// partition heals machine by machine; the first ones back close the
/// breaker while the others are still seconds from reconnecting, and they
/// must not be quarantined for a silence the breaker was covering. (Found
/// by `tests/tests/partitions.rs`; Kubernetes' node lifecycle controller
/// restarts its grace periods the same way when a zone leaves full
/// disruption.)
pub fn next(
    machines: &[MachineView],
    events: &[RemediationEventRecord],
    policy: &RemediationSettings,
    now: UnixSeconds,
    settled_since: UnixSeconds,
) -> Decision {
    let mut actions = Vec::new();
    let mut still_open: BTreeSet<Uuid> = BTreeSet::new();
    let timeout = i64::try_from(policy.replacement_timeout.as_secs()).unwrap_or(i64::MAX);
    for event in events
        .iter()
        .filter(|event| event.state == RemediationState::Requested)
    {
        if let Some(replacement) = machines.iter().find(|machine| replaces(event, machine)) {
            actions.push(Action::Close {
                event_id: event.id.clone(),
                replacement: replacement.id,
            });
        } else if now.saturating_sub(event.opened_at) > timeout {
            actions.push(Action::Fail {
                event_id: event.id.clone(),
                reason: format!(
                    "no operational replacement within {}",
                    humantime::format_duration(policy.replacement_timeout)
                ),
            });
        } else {
            still_open.insert(event.machine_id);
        }
    }
    // A replacement that never turned operational (its event is open or
    // failed) is left to people: replacing it in turn could cascade forever
    // when every new machine fails the same way (a bad image, a bad network).
    let unproven_replacements: BTreeSet<&str> = events
        .iter()
        .filter(|event| event.state != RemediationState::Closed && !event.token_id.is_empty())
        .map(|event| event.token_id.as_str())
        .collect();
    let verdict = breaker(machines, &still_open, policy);
    let mut in_progress = still_open.len();
    if !verdict.open {
        let mut candidates: Vec<(&MachineView, &str, std::time::Duration)> = machines
            .iter()
            .filter(|machine| {
                !machine.retired
                    && !machine.quarantined
                    && unhealthy_state(machine.state)
                    && !still_open.contains(&machine.id)
                    && !unproven_replacements.contains(machine.enrolled_with_token.as_str())
            })
            .filter_map(|machine| {
                let rule = policy.rules.iter().find(|rule| {
                    rule.selector.matches(
                        |key| machine.labels.get(key).map(String::as_str),
                        &machine.zone,
                    )
                })?;
                // Strictly longer: times are whole seconds, so `>=` could act
                // up to a second early.
                let waited = now.saturating_sub(machine.since.max(settled_since));
                (waited > i64::try_from(rule.after.as_secs()).unwrap_or(i64::MAX)).then_some((
                    machine,
                    rule.provider.as_str(),
                    rule.after,
                ))
            })
            .collect();
        // The longest-suffering machines first.
        candidates.sort_by_key(|(machine, _, _)| (machine.since, machine.id));
        for (machine, provider, after) in candidates {
            if in_progress >= policy.max_concurrent as usize {
                break;
            }
            in_progress += 1;
            actions.push(Action::Remediate {
                machine_id: machine.id,
                provider: provider.to_owned(),
                reason: format!(
                    "{} for more than {}",
                    machine.state,
                    humantime::format_duration(after)
                ),
            });
        }
    }
    Decision {
        actions,
        breaker: verdict,
        in_progress: u32::try_from(in_progress).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use flotte_proto::labels::Selector;

    use super::*;
    use crate::domain::repair::settings::RemediationRule;
    use MachineState::{Down, Operational, Unknown, Unreachable};

    fn policy() -> RemediationSettings {
        RemediationSettings {
            breaker: true,
            max_unhealthy_zone_percent: 50,
            max_unhealthy_fleet_percent: 50,
            max_concurrent: 2,
            interval: Duration::from_secs(1),
            replacement_timeout: Duration::from_secs(600),
            rules: vec![RemediationRule {
                selector: Selector::parse("role=web").unwrap(),
                selector_text: "role=web".into(),
                after: Duration::from_secs(60),
                provider: "local".into(),
            }],
            providers: Vec::new(),
        }
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn machine(n: u128, zone: &str, state: MachineState, since: i64) -> MachineView {
        MachineView {
            id: id(n),
            hostname: format!("m{n}"),
            zone: zone.into(),
            labels: [("role".to_owned(), "web".to_owned())].into(),
            state,
            since,
            quarantined: false,
            retired: false,
            enrolled_with_token: format!("token-{n}"),
        }
    }

    fn event(n: u128, machine: u128, token: &str, opened_at: i64) -> RemediationEventRecord {
        RemediationEventRecord {
            id: format!("event-{n}"),
            machine_id: id(machine),
            hostname: format!("m{machine}"),
            zone: "dc1".into(),
            labels: [("role".to_owned(), "web".to_owned())].into(),
            provider: "local".into(),
            state: RemediationState::Requested,
            reason: "down".into(),
            opened_at,
            updated_at: opened_at,
            token_id: token.into(),
            replacement_machine_id: None,
            detail: String::new(),
        }
    }

    /// Three healthy web machines in each of dc1 and dc2.
    fn fleet() -> Vec<MachineView> {
        (1..=6)
            .map(|n| machine(n, if n <= 3 { "dc1" } else { "dc2" }, Operational, 0))
            .collect()
    }

    fn with(mut machines: Vec<MachineView>, change: impl Fn(&mut MachineView)) -> Vec<MachineView> {
        for machine in &mut machines {
            change(machine);
        }
        machines
    }

    fn remediated(decision: &Decision) -> Vec<Uuid> {
        decision
            .actions
            .iter()
            .filter_map(|action| match action {
                Action::Remediate { machine_id, .. } => Some(*machine_id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn remediation_decision_table() {
        let now = 1_000;
        let down_long = |n: u128| {
            move |machine: &mut MachineView| {
                if machine.id == id(n) {
                    machine.state = Down;
                    machine.since = now - 120;
                }
            }
        };
        struct Case {
            name: &'static str,
            machines: Vec<MachineView>,
            events: Vec<RemediationEventRecord>,
            remediate: Vec<Uuid>,
            breaker_open: bool,
        }
        let cases = vec![
            Case {
                name: "all healthy: nothing",
                machines: fleet(),
                events: vec![],
                remediate: vec![],
                breaker_open: false,
            },
            Case {
                name: "down past the threshold: remediate",
                machines: with(fleet(), down_long(1)),
                events: vec![],
                remediate: vec![id(1)],
                breaker_open: false,
            },
            Case {
                name: "down, not long enough: wait",
                machines: with(fleet(), |machine| {
                    if machine.id == id(1) {
                        machine.state = Down;
                        machine.since = now - 30;
                    }
                }),
                events: vec![],
                remediate: vec![],
                breaker_open: false,
            },
            Case {
                name: "exactly the threshold is not longer than it",
                machines: with(fleet(), |machine| {
                    if machine.id == id(1) {
                        machine.state = Down;
                        machine.since = now - 60;
                    }
                }),
                events: vec![],
                remediate: vec![],
                breaker_open: false,
            },
            Case {
                name: "unreachable counts like down",
                machines: with(fleet(), |machine| {
                    if machine.id == id(4) {
                        machine.state = Unreachable;
                        machine.since = now - 61;
                    }
                }),
                events: vec![],
                remediate: vec![id(4)],
                breaker_open: false,
            },
            Case {
                name: "not matching any rule: left alone",
                machines: with(with(fleet(), down_long(1)), |machine| {
                    machine.labels.insert("role".into(), "db".into());
                }),
                events: vec![],
                remediate: vec![],
                breaker_open: false,
            },
            Case {
                name: "already quarantined by hand: left alone",
                machines: with(with(fleet(), down_long(1)), |machine| {
                    machine.quarantined = machine.id == id(1);
                }),
                events: vec![],
                remediate: vec![],
                breaker_open: false,
            },
            Case {
                name: "two of three in a zone down (a partition): breaker open",
                machines: with(with(fleet(), down_long(1)), down_long(2)),
                events: vec![],
                remediate: vec![],
                breaker_open: true,
            },
            Case {
                name: "being remediated counts as unhealthy",
                machines: with(with(fleet(), down_long(2)), |machine| {
                    machine.quarantined = machine.quarantined || machine.id == id(1);
                }),
                events: vec![event(1, 1, "token-new", now - 10)],
                remediate: vec![],
                breaker_open: true,
            },
            Case {
                name: "set aside after its event: not counted",
                machines: with(with(fleet(), down_long(2)), |machine| {
                    if machine.id == id(1) {
                        machine.quarantined = true;
                        machine.state = Down;
                    }
                }),
                events: vec![RemediationEventRecord {
                    state: RemediationState::Closed,
                    ..event(1, 1, "token-new", now - 100)
                }],
                remediate: vec![id(2)],
                breaker_open: false,
            },
            Case {
                name: "a replacement that is down itself is not replaced in turn",
                machines: with(fleet(), |machine| {
                    if machine.id == id(1) {
                        machine.quarantined = true;
                        machine.state = Down;
                    }
                    if machine.id == id(2) {
                        machine.enrolled_with_token = "token-new".into();
                        machine.state = Down;
                        machine.since = now - 500;
                    }
                }),
                events: vec![RemediationEventRecord {
                    state: RemediationState::Failed,
                    ..event(1, 1, "token-new", now - 900)
                }],
                remediate: vec![],
                breaker_open: false,
            },
            Case {
                name: "at most max_concurrent at once, oldest first",
                machines: with(with(with(fleet(), down_long(1)), down_long(4)), |machine| {
                    if machine.id == id(4) {
                        machine.since = now - 500;
                    }
                }),
                events: vec![event(9, 9, "token-x", now - 10)],
                remediate: vec![id(4)],
                breaker_open: false,
            },
        ];
        for case in cases {
            let decision = next(&case.machines, &case.events, &policy(), now, 0);
            assert_eq!(remediated(&decision), case.remediate, "{}", case.name);
            assert_eq!(
                decision.breaker.open, case.breaker_open,
                "{}: {:?}",
                case.name, decision.breaker
            );
        }
    }

    #[test]
    fn unhealthiness_counts_only_from_when_the_breaker_was_last_open() {
        let now = 10_000;
        // m1 has been down for 500 s; the rule waits 60 s.
        let machines = with(fleet(), |machine| {
            if machine.id == id(1) {
                machine.state = Down;
                machine.since = now - 500;
            }
        });
        let cases = [
            ("settled long ago: the whole silence counts", 0, vec![id(1)]),
            ("breaker open until this round", now, vec![]),
            ("breaker closed 30 s ago: not yet 60 s", now - 30, vec![]),
            (
                "breaker closed 61 s ago: past the rule",
                now - 61,
                vec![id(1)],
            ),
            (
                "settled before the machine fell: from its fall",
                now - 900,
                vec![id(1)],
            ),
        ];
        for (name, settled_since, expected) in cases {
            let decision = next(&machines, &[], &policy(), now, settled_since);
            assert_eq!(remediated(&decision), expected, "{name}");
        }
    }

    #[test]
    fn the_breaker_says_which_zone_and_can_be_turned_off() {
        let machines = with(fleet(), |machine| {
            if machine.zone == "dc2" {
                machine.state = Unreachable;
                machine.since = 0;
            }
        });
        let verdict = breaker(&machines, &BTreeSet::new(), &policy());
        assert_eq!(
            verdict.reasons,
            ["zone dc2: 3 of 3 machines unhealthy (100% > 50%)"]
        );
        let off = RemediationSettings {
            breaker: false,
            ..policy()
        };
        assert!(!breaker(&machines, &BTreeSet::new(), &off).open);
        let decision = next(&machines, &[], &off, 1_000, 0);
        assert_eq!(remediated(&decision), vec![id(4), id(5)], "max 2 at once");
    }

    #[test]
    fn events_close_on_an_operational_replacement_with_the_same_labels_and_zone() {
        let now = 1_000;
        let open = event(1, 1, "token-r", now - 100);
        let replacement = |state: MachineState, zone: &str| MachineView {
            enrolled_with_token: "token-r".into(),
            ..machine(7, zone, state, now)
        };
        let base = with(fleet(), |machine| {
            if machine.id == id(1) {
                machine.quarantined = true;
                machine.state = Down;
            }
        });
        let decide = |extra: Option<MachineView>| {
            let mut machines = base.clone();
            machines.extend(extra);
            next(&machines, std::slice::from_ref(&open), &policy(), now, 0).actions
        };
        assert_eq!(
            decide(Some(replacement(Operational, "dc1"))),
            vec![Action::Close {
                event_id: "event-1".into(),
                replacement: id(7)
            }]
        );
        assert_eq!(decide(Some(replacement(Unknown, "dc1"))), vec![]);
        assert_eq!(decide(Some(replacement(Operational, "dc2"))), vec![]);
        assert_eq!(decide(None), vec![]);
        let late = next(
            &base,
            std::slice::from_ref(&open),
            &policy(),
            now + 10_000,
            0,
        )
        .actions;
        assert!(
            matches!(&late[..], [Action::Fail { event_id, reason }] if event_id == "event-1" && reason.contains("10m")),
            "{late:?}"
        );
    }
}
