//! Wave assignment, decided once when a rollout is created and stored (so
//! `--dry-run`, `rollout show` and the controller all see the same waves).
//!
//! A machine belongs to the first stage whose selector matches it and that
//! still has room: a stage whose machines a later stage also selects (the
//! canary before `env=prod` waves) takes exactly one wave and leaves the
//! rest to the stages after it; otherwise a stage takes all its machines,
//! in waves of `batch`. Within a stage, zones are interleaved (round-robin, the starting zone rotating
//! from wave to wave) and no wave takes more than `max_unavailable_per_zone`
//! machines of one zone. Pure: no store, no clock.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use uuid::Uuid;

use super::plan::Plan;
use crate::store::MachineRecord;

/// A machine that may take part in a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: Uuid,
    pub hostname: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
}

/// The machines a new rollout may take: neither retired (a retired machine
/// never comes back) nor quarantined (set aside for investigation).
pub fn candidates(machines: &[MachineRecord], quarantined: &HashSet<Uuid>) -> Vec<Candidate> {
    machines
        .iter()
        .filter(|machine| machine.retired_at.is_none() && !quarantined.contains(&machine.id))
        .map(|machine| Candidate {
            id: machine.id,
            hostname: machine.inventory.hostname.clone(),
            zone: machine.zone.clone(),
            labels: machine.labels.clone(),
        })
        .collect()
}

/// Where a machine goes: its stage and its (global) wave number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub machine: Uuid,
    pub hostname: String,
    pub zone: String,
    pub stage: u32,
    pub wave: u32,
}

/// The waves of a plan over `candidates`, in wave order; the stage of each
/// wave is `stage` of its assignments.
pub fn assign_waves(plan: &Plan, candidates: &[Candidate]) -> Vec<Assignment> {
    let mut taken: BTreeSet<Uuid> = BTreeSet::new();
    let mut assignments = Vec::new();
    let mut wave: u32 = 0;
    for (stage_index, stage) in plan.stages.iter().enumerate() {
        let selector = stage.selector();
        let mut members: Vec<&Candidate> = candidates
            .iter()
            .filter(|candidate| !taken.contains(&candidate.id))
            .filter(|candidate| {
                selector.matches(
                    |key| candidate.labels.get(key).map(String::as_str),
                    &candidate.zone,
                )
            })
            .collect();
        members.sort_by(|a, b| (&a.zone, &a.hostname, a.id).cmp(&(&b.zone, &b.hostname, b.id)));
        if members.is_empty() {
            continue;
        }
        let wave_size = stage.batch.of(members.len()).max(1);
        let per_zone_limit = stage
            .max_unavailable_per_zone
            .map_or(usize::MAX, |limit| limit as usize);
        let mut by_zone: BTreeMap<&str, VecDeque<&Candidate>> = BTreeMap::new();
        // A stage sharing its machines with a later stage is a single wave.
        let single_wave = plan.stages[stage_index + 1..].iter().any(|later| {
            let later = later.selector();
            members.iter().any(|member| {
                later.matches(
                    |key| member.labels.get(key).map(String::as_str),
                    &member.zone,
                )
            })
        });
        for member in &members {
            by_zone
                .entry(member.zone.as_str())
                .or_default()
                .push_back(member);
        }
        let zones: Vec<&str> = by_zone.keys().copied().collect();
        let mut waves_in_stage = 0usize;
        while by_zone.values().any(|queue| !queue.is_empty()) {
            let mut in_wave = 0usize;
            let mut per_zone: BTreeMap<&str, usize> = BTreeMap::new();
            // Rotating the first zone spreads the first machine of each wave
            // (the canary, with batch = 1) across zones.
            let start = waves_in_stage % zones.len();
            loop {
                let mut took_any = false;
                for offset in 0..zones.len() {
                    if in_wave >= wave_size {
                        break;
                    }
                    let zone = zones[(start + offset) % zones.len()];
                    let count = per_zone.entry(zone).or_default();
                    if *count >= per_zone_limit {
                        continue;
                    }
                    if let Some(machine) = by_zone.get_mut(zone).and_then(VecDeque::pop_front) {
                        *count += 1;
                        in_wave += 1;
                        took_any = true;
                        taken.insert(machine.id);
                        assignments.push(Assignment {
                            machine: machine.id,
                            hostname: machine.hostname.clone(),
                            zone: machine.zone.clone(),
                            stage: u32::try_from(stage_index).unwrap_or(u32::MAX),
                            wave,
                        });
                    }
                }
                if !took_any || in_wave >= wave_size {
                    break;
                }
            }
            waves_in_stage += 1;
            wave += 1;
            if single_wave {
                break;
            }
        }
    }
    assignments
}

/// The stage of each wave, in wave order.
pub fn wave_stages(assignments: &[Assignment]) -> Vec<u32> {
    let mut stages: Vec<u32> = Vec::new();
    for assignment in assignments {
        let index = assignment.wave as usize;
        if stages.len() <= index {
            stages.resize(index + 1, assignment.stage);
        }
        stages[index] = assignment.stage;
    }
    stages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::rollout::plan::parse_plan;

    fn machine(index: u128, zone: &str, labels: &str) -> Candidate {
        Candidate {
            id: Uuid::from_u128(index),
            hostname: format!("m{index:02}"),
            zone: zone.to_owned(),
            labels: flotte_proto::labels::parse_labels(labels).unwrap(),
        }
    }

    fn record(index: u128, retired_at: Option<crate::store::UnixSeconds>) -> MachineRecord {
        MachineRecord {
            labels: flotte_proto::labels::parse_labels("env=prod").unwrap(),
            retired_at,
            ..crate::store::contract::machine(Uuid::from_u128(index), &format!("m{index:02}"))
        }
    }

    #[test]
    fn retired_and_quarantined_machines_are_not_candidates() {
        // (case, retired, quarantined, a candidate)
        let table = [
            ("in service", false, false, true),
            ("retired", true, false, false),
            ("quarantined", false, true, false),
            ("retired and quarantined", true, true, false),
        ];
        for (index, (case, retired, quarantined, expected)) in table.into_iter().enumerate() {
            let stored = record(index as u128, retired.then_some(5));
            let set_aside: HashSet<Uuid> = if quarantined {
                HashSet::from([stored.id])
            } else {
                HashSet::new()
            };
            let found = candidates(std::slice::from_ref(&stored), &set_aside);
            let wanted: Vec<Candidate> = if expected {
                vec![machine(index as u128, "dc1", "env=prod")]
            } else {
                Vec::new()
            };
            assert_eq!(found, wanted, "{case}");
        }
    }

    fn waves_of(assignments: &[Assignment]) -> Vec<Vec<String>> {
        let mut waves: Vec<Vec<String>> = Vec::new();
        for assignment in assignments {
            let index = assignment.wave as usize;
            if waves.len() <= index {
                waves.resize(index + 1, Vec::new());
            }
            waves[index].push(format!("{}/{}", assignment.hostname, assignment.zone));
        }
        waves
    }

    #[test]
    fn first_matching_stage_wins_and_zones_interleave() {
        let plan = parse_plan(
            r#"
[[stage]]
name = "qualification"
selector = "env=qa"
[[stage]]
name = "canary"
selector = "env=prod"
batch = 1
[[stage]]
name = "waves"
selector = "env=prod"
batch = 3
max_unavailable_per_zone = 1
"#,
        )
        .unwrap();
        let fleet = vec![
            machine(1, "dc1", "env=qa"),
            machine(2, "dc1", "env=prod"),
            machine(3, "dc1", "env=prod"),
            machine(4, "dc2", "env=prod"),
            machine(5, "dc2", "env=prod"),
            machine(6, "dc3", "env=prod"),
            machine(7, "dc3", "env=prod"),
            machine(8, "dc3", "env=other"),
        ];
        let assignments = assign_waves(&plan, &fleet);
        assert_eq!(
            waves_of(&assignments),
            vec![
                vec!["m01/dc1"],
                vec!["m02/dc1"],
                // Canary took m02; each wave takes at most one per zone.
                vec!["m03/dc1", "m04/dc2", "m06/dc3"],
                vec!["m05/dc2", "m07/dc3"],
            ]
        );
        assert_eq!(wave_stages(&assignments), vec![0, 1, 2, 2]);
        assert!(
            !assignments.iter().any(|a| a.hostname == "m08"),
            "unmatched machines are not in the rollout"
        );
    }

    #[test]
    fn percentages_and_zone_limits_bound_every_wave() {
        let plan = parse_plan(
            "[[stage]]\nname = \"all\"\nbatch = \"50%\"\nmax_unavailable_per_zone = 2\n",
        )
        .unwrap();
        let fleet: Vec<Candidate> = (0..12)
            .map(|index| machine(index, if index < 8 { "big" } else { "small" }, ""))
            .collect();
        let assignments = assign_waves(&plan, &fleet);
        let waves = waves_of(&assignments);
        for wave in &waves {
            assert!(wave.len() <= 6, "{wave:?}");
            for zone in ["big", "small"] {
                let in_zone = wave.iter().filter(|m| m.ends_with(zone)).count();
                assert!(in_zone <= 2, "{zone} in {wave:?}");
            }
        }
        assert_eq!(assignments.len(), 12, "everyone gets a wave");
        // 8 machines in one zone at 2 per wave need 4 waves.
        assert_eq!(waves.len(), 4, "{waves:?}");
    }

    #[test]
    fn stages_matching_nothing_have_no_waves() {
        let plan = parse_plan(
            "[[stage]]\nname = \"qa\"\nselector = \"env=qa\"\n[[stage]]\nname = \"rest\"\n",
        )
        .unwrap();
        let assignments = assign_waves(&plan, &[machine(1, "dc1", "env=prod")]);
        assert_eq!(assignments.len(), 1);
        assert_eq!((assignments[0].stage, assignments[0].wave), (1, 0));
    }
}
