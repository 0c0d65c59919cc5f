//! "What if we lose this zone": pure functions over the machines' current
//! states. A group is the set of machines sharing one value of a label (e.g.
//! `role=web`); its capacity is the number of its operational machines that
//! are not quarantined (a quarantined machine is out of service).

use std::collections::{BTreeMap, BTreeSet};

use crate::domain::health::MachineState;

/// A machine as the impact computation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrMachine {
    pub zone: String,
    /// The value of the grouping label (`(none)` when the machine lacks it).
    pub group: String,
    pub state: MachineState,
    pub quarantined: bool,
}

impl DrMachine {
    fn serves(&self) -> bool {
        self.state == MachineState::Operational && !self.quarantined
    }
}

/// Label value used for machines without the grouping label.
pub const NO_GROUP: &str = "(none)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Operational,
    Degraded,
    Down,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Operational => "operational",
            GroupState::Degraded => "degraded",
            GroupState::Down => "down",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupImpact {
    pub group: String,
    pub machines_before: u32,
    pub machines_after: u32,
    pub operational_before: u32,
    pub operational_after: u32,
    /// The declared minimum of operational machines, if any.
    pub minimum: Option<u32>,
    pub state_after: GroupState,
}

/// The state of a group left with `operational` serving machines: against
/// the declared minimum if there is one, else against what it had (any loss
/// of capacity degrades it).
pub fn group_state(operational: u32, before: u32, minimum: Option<u32>) -> GroupState {
    if operational == 0 {
        return GroupState::Down;
    }
    let needed = minimum.unwrap_or(before);
    if operational >= needed {
        GroupState::Operational
    } else {
        GroupState::Degraded
    }
}

/// Before/after per group, sorted by group name. `minimums` maps a group
/// (label value) to its declared minimum. Retired machines must not be passed.
pub fn zone_loss_impact(
    machines: &[DrMachine],
    lost_zones: &BTreeSet<String>,
    minimums: &BTreeMap<String, u32>,
) -> Vec<GroupImpact> {
    let mut groups: BTreeMap<&str, Vec<&DrMachine>> = BTreeMap::new();
    for machine in machines {
        groups.entry(&machine.group).or_default().push(machine);
    }
    // A group declared with a minimum but with no machine at all is down already.
    for group in minimums.keys() {
        groups.entry(group).or_default();
    }
    groups
        .into_iter()
        .map(|(group, members)| {
            let count = |filter: &dyn Fn(&DrMachine) -> bool| -> u32 {
                u32::try_from(members.iter().filter(|machine| filter(machine)).count())
                    .unwrap_or(u32::MAX)
            };
            let survives = |machine: &DrMachine| !lost_zones.contains(&machine.zone);
            let operational_before = count(&DrMachine::serves);
            let operational_after = count(&|machine| machine.serves() && survives(machine));
            let minimum = minimums.get(group).copied();
            GroupImpact {
                group: group.to_owned(),
                machines_before: count(&|_| true),
                machines_after: count(&survives),
                operational_before,
                operational_after,
                minimum,
                state_after: group_state(operational_after, operational_before, minimum),
            }
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinglePoint {
    pub group: String,
    pub zone: String,
    pub operational: u32,
    pub machines: u32,
}

/// Groups whose serving machines all sit in one zone (losing that zone
/// loses the group), sorted by group name.
pub fn single_points_of_failure(machines: &[DrMachine]) -> Vec<SinglePoint> {
    let mut groups: BTreeMap<&str, (BTreeSet<&str>, u32, u32)> = BTreeMap::new();
    for machine in machines {
        let entry = groups.entry(&machine.group).or_default();
        entry.2 += 1;
        if machine.serves() {
            entry.0.insert(&machine.zone);
            entry.1 += 1;
        }
    }
    groups
        .into_iter()
        .filter_map(|(group, (zones, operational, machines))| {
            let mut zones = zones.into_iter();
            match (zones.next(), zones.next()) {
                (Some(zone), None) => Some(SinglePoint {
                    group: group.to_owned(),
                    zone: zone.to_owned(),
                    operational,
                    machines,
                }),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineState::{Down, Operational, Unreachable};

    fn machine(zone: &str, group: &str, state: MachineState) -> DrMachine {
        DrMachine {
            zone: zone.into(),
            group: group.into(),
            state,
            quarantined: false,
        }
    }

    fn fleet() -> Vec<DrMachine> {
        vec![
            machine("dc1", "web", Operational),
            machine("dc2", "web", Operational),
            machine("dc3", "web", Operational),
            machine("dc1", "db", Operational),
            machine("dc2", "db", Down),
            machine("dc1", "cache", Operational),
            machine("dc1", "cache", Operational),
            DrMachine {
                quarantined: true,
                ..machine("dc2", "cache", Operational)
            },
            machine("dc3", "batch", Unreachable),
        ]
    }

    #[test]
    fn zone_loss_tables() {
        let minimums: BTreeMap<String, u32> =
            [("web".to_owned(), 2), ("queue".to_owned(), 1)].into();
        // (lost zones, group, machines before/after, operational before/after, state)
        type Case<'a> = (&'a [&'a str], &'a str, (u32, u32), (u32, u32), GroupState);
        let cases: &[Case] = &[
            (&["dc1"], "web", (3, 2), (3, 2), GroupState::Operational),
            (&["dc1", "dc2"], "web", (3, 1), (3, 1), GroupState::Degraded),
            (
                &["dc1", "dc2", "dc3"],
                "web",
                (3, 0),
                (3, 0),
                GroupState::Down,
            ),
            (&["dc1"], "db", (2, 1), (1, 0), GroupState::Down),
            (&["dc2"], "db", (2, 1), (1, 1), GroupState::Operational),
            // No minimum declared: any lost capacity degrades.
            (&["dc2"], "cache", (3, 2), (2, 2), GroupState::Operational),
            (&["dc9"], "cache", (3, 3), (2, 2), GroupState::Operational),
            (&["dc1"], "cache", (3, 1), (2, 0), GroupState::Down),
            (&["dc3"], "batch", (1, 0), (0, 0), GroupState::Down),
            // Declared but no machine at all.
            (&[], "queue", (0, 0), (0, 0), GroupState::Down),
        ];
        for (lost, group, machines, operational, state) in cases {
            let lost: BTreeSet<String> = lost.iter().map(|zone| (*zone).to_owned()).collect();
            let impact = zone_loss_impact(&fleet(), &lost, &minimums);
            let row = impact
                .iter()
                .find(|row| row.group == *group)
                .unwrap_or_else(|| panic!("no row for {group}"));
            assert_eq!(
                (row.machines_before, row.machines_after),
                *machines,
                "{lost:?} {group}"
            );
            assert_eq!(
                (row.operational_before, row.operational_after),
                *operational,
                "{lost:?} {group}"
            );
            assert_eq!(row.state_after, *state, "{lost:?} {group}");
        }
        let groups: Vec<String> = zone_loss_impact(&fleet(), &BTreeSet::new(), &minimums)
            .into_iter()
            .map(|row| row.group)
            .collect();
        assert_eq!(groups, ["batch", "cache", "db", "queue", "web"]);
    }

    #[test]
    fn group_state_against_minimum_or_previous_capacity() {
        assert_eq!(group_state(0, 3, None), GroupState::Down);
        assert_eq!(group_state(3, 3, None), GroupState::Operational);
        assert_eq!(group_state(2, 3, None), GroupState::Degraded);
        assert_eq!(group_state(2, 3, Some(2)), GroupState::Operational);
        assert_eq!(group_state(1, 3, Some(2)), GroupState::Degraded);
        assert_eq!(group_state(5, 5, Some(6)), GroupState::Degraded);
    }

    #[test]
    fn single_points_are_groups_serving_from_one_zone() {
        let points = single_points_of_failure(&fleet());
        let found: Vec<(&str, &str, u32, u32)> = points
            .iter()
            .map(|point| {
                (
                    point.group.as_str(),
                    point.zone.as_str(),
                    point.operational,
                    point.machines,
                )
            })
            .collect();
        // web spans three zones; batch serves nowhere (not a single point, it is down).
        assert_eq!(found, [("cache", "dc1", 2, 3), ("db", "dc1", 1, 2)]);
    }
}
