//! The swap journal: each step of a swap is recorded durably (temp file,
//! fsync, rename, fsync dir) *before* it is taken, so that an agent killed
//! at any point can finish or undo the swap when it starts again.
//!
//! Recovery rule ([`recovery_action`], pure): before the switch nothing of the
//! running image was touched, so the attempt is dropped; from the switch on,
//! the new image was never proven healthy, so the agent switches back; a
//! journal at `committing` is finished. The machine always ends on a
//! committed image.

use serde::{Deserialize, Serialize};

use super::layout::{ImageLayout, LocalImage};

/// Steps in order. A step is journalled before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwapStep {
    Downloading,
    VerifyingPayload,
    Unpacking,
    Switching,
    Restarting,
    Verifying,
    Committing,
    RollingBack,
}

impl SwapStep {
    pub const ALL: [SwapStep; 8] = [
        SwapStep::Downloading,
        SwapStep::VerifyingPayload,
        SwapStep::Unpacking,
        SwapStep::Switching,
        SwapStep::Restarting,
        SwapStep::Verifying,
        SwapStep::Committing,
        SwapStep::RollingBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SwapStep::Downloading => "downloading",
            SwapStep::VerifyingPayload => "verifying_payload",
            SwapStep::Unpacking => "unpacking",
            SwapStep::Switching => "switching",
            SwapStep::Restarting => "restarting",
            SwapStep::Verifying => "verifying",
            SwapStep::Committing => "committing",
            SwapStep::RollingBack => "rolling_back",
        }
    }
}

/// One swap in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapJournal {
    pub target: LocalImage,
    /// What `current` pointed at before the swap (None: first image).
    pub previous: Option<LocalImage>,
    pub step: SwapStep,
    pub desired_version: u64,
    pub started_at: i64,
}

/// What a starting agent does with a journal left by a previous run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryAction {
    /// Nothing of the running image changed: forget the attempt.
    Discard,
    /// The new image is in place but unproven: switch back and restart.
    RollBack,
    /// The commit was decided: record it.
    FinishCommit,
}

pub fn recovery_action(step: SwapStep) -> RecoveryAction {
    match step {
        SwapStep::Downloading | SwapStep::VerifyingPayload | SwapStep::Unpacking => {
            RecoveryAction::Discard
        }
        SwapStep::Switching
        | SwapStep::Restarting
        | SwapStep::Verifying
        | SwapStep::RollingBack => RecoveryAction::RollBack,
        SwapStep::Committing => RecoveryAction::FinishCommit,
    }
}

pub fn load(layout: &ImageLayout) -> std::io::Result<Option<SwapJournal>> {
    match std::fs::read(layout.journal_path()) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// Records `journal` durably, then (with the `swap-hold` feature, for tests)
/// stops here forever if `FLOTTE_HOLD_AT_STEP` names this step, so that a
/// test can kill the agent exactly at it.
pub fn record(layout: &ImageLayout, journal: &SwapJournal) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(journal).map_err(std::io::Error::other)?;
    flotte_proto::files::write_atomically(&layout.journal_path(), &bytes)?;
    hold_if_requested(journal.step);
    Ok(())
}

pub fn clear(layout: &ImageLayout) -> std::io::Result<()> {
    match std::fs::remove_file(layout.journal_path()) {
        Ok(()) => std::fs::File::open(layout.images_dir())?.sync_all(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(feature = "swap-hold")]
fn hold_if_requested(step: SwapStep) {
    if std::env::var("FLOTTE_HOLD_AT_STEP").is_ok_and(|wanted| wanted == step.as_str()) {
        tracing::warn!(
            step = step.as_str(),
            "holding at swap step (FLOTTE_HOLD_AT_STEP)"
        );
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

#[cfg(not(feature = "swap-hold"))]
fn hold_if_requested(_step: SwapStep) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_never_leaves_an_unproven_image_running() {
        use RecoveryAction::*;
        let expected = [
            Discard,
            Discard,
            Discard,
            RollBack,
            RollBack,
            RollBack,
            FinishCommit,
            RollBack,
        ];
        for (step, action) in SwapStep::ALL.into_iter().zip(expected) {
            assert_eq!(recovery_action(step), action, "{step:?}");
        }
    }

    #[test]
    fn journal_round_trips_and_clears() {
        let dir = std::env::temp_dir().join(format!("flotte-journal-{}", uuid::Uuid::new_v4()));
        let layout = ImageLayout::new(&dir);
        layout.ensure_dirs().unwrap();
        let journal = SwapJournal {
            target: LocalImage {
                name: "app".into(),
                version: "2.0.0".into(),
                digest: "b".repeat(64),
            },
            previous: None,
            step: SwapStep::Verifying,
            desired_version: 3,
            started_at: 1,
        };
        record(&layout, &journal).unwrap();
        assert_eq!(load(&layout).unwrap(), Some(journal));
        clear(&layout).unwrap();
        assert_eq!(load(&layout).unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
