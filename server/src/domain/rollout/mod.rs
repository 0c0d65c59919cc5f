//! Staged rollouts: an image moved across the fleet stage by stage
//! (qualification → canary → waves), gated by health, halting and rolling
//! back by itself.
//!
//! What lives here: the plan file (`plan`), the wave assignment made once at
//! creation (`waves`), the pure decision function over stored state
//! (`controller::next`), with the small rules creation uses (`rollback_image`,
//! `waves::candidates`); the thin loop that applies the decisions is the
//! live layer's rollout engine. What must never live here: tonic or proto
//! types (the API converts at its edge), or I/O — the engine only persists,
//! pushes and wakes. Every change of a machine's
//! rollout state is stored *before* the desired state is pushed, so a server
//! killed at any moment resumes without swapping a machine twice.

pub mod controller;
pub mod plan;
pub mod preflight;
pub mod waves;

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::health::{MachineState, ReportedImage};
use crate::store::{DesiredImageRecord, UnixSeconds};

pub use plan::{OnFailure, Plan, PlanError};

/// Why a rollout request was refused; converted to a gRPC status in `api`.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("no rollout {0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("machines already in rollout {rollout}: {machines}")]
    Conflict { rollout: Uuid, machines: String },
    #[error("the plan selects no machine")]
    NoMachines,
    /// The rollout is a downgrade, or all its machines are unreachable,
    /// and `--force` was not given.
    #[error("rollout of {image} not started: {reasons}; check with --dry-run, then add --force to start it anyway")]
    NeedsForce { image: String, reasons: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The life of a rollout. `RollingBack` is the in-progress state between a
/// halt with `on_failure = rollback` (or `rollout rollback`) and `RolledBack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Pending,
    Running,
    Paused,
    RollingBack,
    Succeeded,
    Failed,
    Aborted,
    RolledBack,
}

impl RolloutState {
    pub const ALL: [RolloutState; 8] = [
        RolloutState::Pending,
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::RollingBack,
        RolloutState::Succeeded,
        RolloutState::Failed,
        RolloutState::Aborted,
        RolloutState::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Pending => "pending",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::RollingBack => "rolling_back",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Failed => "failed",
            RolloutState::Aborted => "aborted",
            RolloutState::RolledBack => "rolled_back",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        RolloutState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    /// Final: nothing happens to the rollout any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RolloutState::Succeeded
                | RolloutState::Failed
                | RolloutState::Aborted
                | RolloutState::RolledBack
        )
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one machine is in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineRolloutState {
    Pending,
    Sent,
    Downloading,
    Switching,
    Verifying,
    Committed,
    Failed,
    /// Told to go back to its previous image (rollback path).
    RollingBack,
    RolledBack,
}

impl MachineRolloutState {
    pub const ALL: [MachineRolloutState; 9] = [
        MachineRolloutState::Pending,
        MachineRolloutState::Sent,
        MachineRolloutState::Downloading,
        MachineRolloutState::Switching,
        MachineRolloutState::Verifying,
        MachineRolloutState::Committed,
        MachineRolloutState::Failed,
        MachineRolloutState::RollingBack,
        MachineRolloutState::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MachineRolloutState::Pending => "pending",
            MachineRolloutState::Sent => "sent",
            MachineRolloutState::Downloading => "downloading",
            MachineRolloutState::Switching => "switching",
            MachineRolloutState::Verifying => "verifying",
            MachineRolloutState::Committed => "committed",
            MachineRolloutState::Failed => "failed",
            MachineRolloutState::RollingBack => "rolling_back",
            MachineRolloutState::RolledBack => "rolled_back",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        MachineRolloutState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    /// Told to swap to the rollout's image and not finished yet.
    pub fn is_in_flight(self) -> bool {
        matches!(
            self,
            MachineRolloutState::Sent
                | MachineRolloutState::Downloading
                | MachineRolloutState::Switching
                | MachineRolloutState::Verifying
        )
    }
}

impl fmt::Display for MachineRolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The image a rollout moves machines to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutImage {
    pub name: String,
    pub version: String,
    pub digest: String,
}

impl RolloutImage {
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn desired(&self) -> DesiredImageRecord {
        DesiredImageRecord {
            name: self.name.clone(),
            version: self.version.clone(),
            digest: self.digest.clone(),
            rollback: false,
        }
    }
}

/// What a rollback restores on a machine, chosen at creation: the image it
/// reports running (a report without a digest names nothing), else the one
/// it was told to run; marked as a rollback so the agent accepts a lower
/// version.
pub fn rollback_image(
    reported_current: Option<&ReportedImage>,
    desired: Option<&DesiredImageRecord>,
) -> Option<DesiredImageRecord> {
    match reported_current {
        Some(current) if !current.digest.is_empty() => Some(DesiredImageRecord {
            name: current.name.clone(),
            version: current.version.clone(),
            digest: current.digest.clone(),
            rollback: true,
        }),
        _ => desired.map(|image| DesiredImageRecord {
            rollback: true,
            ..image.clone()
        }),
    }
}

/// The image a machine runs (reported, else desired) when `wanted` is an
/// older version of it: a downgrade, which the agent refuses unless it is
/// marked as a rollback, so the server says so at the call instead.
/// Unparseable versions are never called older (the agent's own rule).
pub fn downgrade_from(
    running: Option<&DesiredImageRecord>,
    wanted_name: &str,
    wanted_version: &semver::Version,
) -> Option<String> {
    let running = running?;
    let running_version = semver::Version::parse(&running.version).ok()?;
    (running.name == wanted_name && *wanted_version < running_version)
        .then(|| format!("{}@{}", running.name, running.version))
}

/// A stored rollout (its machines are stored apart, one row each).
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub id: Uuid,
    pub image: RolloutImage,
    pub plan: Plan,
    /// The plan as written by the operator, for `rollout show`.
    pub plan_toml: String,
    pub state: RolloutState,
    /// Why it is in its state (who paused it, what halted it…).
    pub reason: String,
    pub created_at: UnixSeconds,
    pub created_by: String,
    pub updated_at: UnixSeconds,
    /// Number of waves (global across stages) and the stage of each.
    pub wave_stages: Vec<u32>,
    /// The wave in progress, or the next to start when `wave_started_at` is `None`.
    pub current_wave: u32,
    pub wave_started_at: Option<UnixSeconds>,
    /// Stages whose approval gate was passed (`rollout approve`).
    pub approved_stages: Vec<u32>,
    /// How many times the stored row was written: each write names the
    /// revision it read and is refused if another was stored meanwhile (an
    /// operator's command through another replica), so nothing is lost.
    pub revision: u64,
}

impl Rollout {
    pub fn wave_count(&self) -> u32 {
        u32::try_from(self.wave_stages.len()).unwrap_or(u32::MAX)
    }

    pub fn stage_of_wave(&self, wave: u32) -> Option<u32> {
        self.wave_stages.get(wave as usize).copied()
    }
}

/// One machine's place and progress in a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutMachine {
    pub rollout_id: Uuid,
    pub machine_id: Uuid,
    pub hostname: String,
    pub zone: String,
    pub stage: u32,
    pub wave: u32,
    pub state: MachineRolloutState,
    /// The image it ran when the rollout was created: what a rollback restores.
    pub previous_image: Option<DesiredImageRecord>,
    /// When its wave started (its deadline is measured from then).
    pub turn_at: Option<UnixSeconds>,
    /// When the desired image was stored for it (forward or rollback).
    pub sent_at: Option<UnixSeconds>,
    pub committed_at: Option<UnixSeconds>,
    /// When it reached a final state (committed, failed, rolled back).
    pub finished_at: Option<UnixSeconds>,
    pub failure_reason: String,
}

/// What the agent last said about a swap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SwapView {
    pub target_digest: String,
    pub step: String,
    /// in_progress, committed or failed.
    pub outcome: String,
    pub message: String,
    /// Agent clock, unix seconds.
    pub updated_at: UnixSeconds,
}

/// The live facts about a machine, from the registry and the health tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMachine {
    pub connected: bool,
    pub health: MachineState,
    /// Since when it is in `health` (server clock).
    pub health_since: UnixSeconds,
    pub current_digest: Option<String>,
    pub swap: Option<SwapView>,
    /// Set aside for investigation (`machines quarantine`): never swapped.
    pub quarantined: bool,
}

/// A machine as the controller sees it: stored progress + live facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineView {
    pub record: RolloutMachine,
    pub live: LiveMachine,
}

/// A machine of a rollout as created, for the module's tests.
#[cfg(test)]
pub(crate) fn pending_machine_for_tests(
    rollout_id: Uuid,
    machine_id: Uuid,
    hostname: &str,
    wave: u32,
    previous_digest: &str,
) -> RolloutMachine {
    RolloutMachine {
        rollout_id,
        machine_id,
        hostname: hostname.to_owned(),
        zone: "dc1".into(),
        stage: 0,
        wave,
        state: MachineRolloutState::Pending,
        previous_image: Some(DesiredImageRecord {
            name: "app".into(),
            version: "1.0.0".into(),
            digest: previous_digest.to_owned(),
            rollback: true,
        }),
        turn_at: None,
        sent_at: None,
        committed_at: None,
        finished_at: None,
        failure_reason: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(digest: &str) -> ReportedImage {
        ReportedImage {
            name: "app".into(),
            version: "1.2.0".into(),
            digest: digest.into(),
        }
    }

    fn image(version: &str, digest: &str, rollback: bool) -> DesiredImageRecord {
        DesiredImageRecord {
            name: "app".into(),
            version: version.into(),
            digest: digest.into(),
            rollback,
        }
    }

    #[test]
    fn only_an_older_version_of_the_same_image_is_a_downgrade() {
        let running = image("1.2.0", "d", false);
        let version = |text: &str| semver::Version::parse(text).unwrap();
        assert_eq!(
            downgrade_from(Some(&running), "app", &version("1.1.9")),
            Some("app@1.2.0".to_owned())
        );
        assert_eq!(
            downgrade_from(Some(&running), "app", &version("1.2.0")),
            None
        );
        assert_eq!(
            downgrade_from(Some(&running), "app", &version("2.0.0")),
            None
        );
        assert_eq!(
            downgrade_from(Some(&running), "other", &version("0.1.0")),
            None
        );
        assert_eq!(downgrade_from(None, "app", &version("0.1.0")), None);
        let unparseable = image("latest", "d", false);
        assert_eq!(
            downgrade_from(Some(&unparseable), "app", &version("0.1.0")),
            None
        );
    }

    #[test]
    fn a_rollback_restores_the_reported_image_else_the_desired_one() {
        let told = image("1.1.0", "told", false);
        let table = [
            (
                "the reported image wins over the desired one",
                Some(reported("running")),
                Some(&told),
                Some(image("1.2.0", "running", true)),
            ),
            (
                "a report without a digest names nothing",
                Some(reported("")),
                Some(&told),
                Some(image("1.1.0", "told", true)),
            ),
            (
                "no report: the desired image",
                None,
                Some(&told),
                Some(image("1.1.0", "told", true)),
            ),
            (
                "reported, never told",
                Some(reported("running")),
                None,
                Some(image("1.2.0", "running", true)),
            ),
            ("nothing known: nothing to restore", None, None, None),
        ];
        for (case, reported_current, desired, expected) in table {
            assert_eq!(
                rollback_image(reported_current.as_ref(), desired),
                expected,
                "{case}"
            );
        }
    }
}
