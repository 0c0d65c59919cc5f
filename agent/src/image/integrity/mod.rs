//! Image integrity: the running image stays what was signed, or the server
//! hears about it. `index` makes the file index of a freshly unpacked tree
//! (from the signed payload only) and compares a tree with it; `rate` keeps
//! the verification's reading to a configured rate; this file holds the
//! verifier task, which verifies periodically (with jitter) and on the
//! server's command, asks the swap manager to restore a drifted tree when
//! `on_drift = "restore"` (or when told to), and publishes each result for
//! the session to send.
//!
//! What must never happen here: reading on the session loop (a walk runs on
//! the blocking pool, awaited by this task only), following a symbolic link
//! of the tree, or an unbounded result (at most
//! [`index::MAX_REPORTED_DIFFERENCES`] differences are kept, with counts).

pub mod index;
pub mod rate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotte_proto::v1::{
    ImageAction, ImageCommand, ImageDifference, ImageStatus, ImageVerification,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::index::{
    compare, read_index, walk_tree, write_index, DifferenceKind, Drift, Names, WalkOptions,
};
use self::rate::RateLimiter;
use super::layout::{ImageLayout, LocalImage};
use crate::clock::unix_now;

/// Commands waiting for the verifier; more are refused (the server asks again).
const COMMAND_QUEUE_DEPTH: usize = 4;
/// The first periodic verification after the agent starts (±10 %), unless
/// the interval is shorter.
const FIRST_VERIFICATION_AFTER: Duration = Duration::from_secs(60);
/// Request ids longer than this are cut (they only travel back to the server).
const MAX_REQUEST_ID_CHARS: usize = 64;

/// What to do when a verification finds drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDrift {
    /// Report it (the machine turns degraded) and leave the tree alone.
    Report,
    /// Report it, then re-create the tree from the signed payload.
    Restore,
}

#[derive(Debug, Clone)]
pub struct IntegritySettings {
    /// Between periodic verifications (each one is moved by up to ±10 %).
    pub interval: Duration,
    /// Reading rate of a verification, bytes per second (0: unlimited).
    pub rate_bytes_per_second: u64,
    pub on_drift: OnDrift,
}

/// How a verification ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    Clean,
    Drift(Drift),
    Error(String),
}

/// What a restore did, as the swap manager tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOutcome {
    pub restored: bool,
    pub message: String,
    /// Where the drifted tree is kept, if it was.
    pub kept_tree: Option<PathBuf>,
}

/// One verification of one image tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub request_id: String,
    pub image: LocalImage,
    pub started_at: i64,
    pub duration: Duration,
    pub bytes_read: u64,
    pub entries_checked: u64,
    pub outcome: VerifyOutcome,
    pub restore: Option<RestoreOutcome>,
}

impl Verification {
    /// Differences found (0 when clean or not verifiable).
    pub fn drift_files(&self) -> u64 {
        match &self.outcome {
            VerifyOutcome::Drift(drift) => drift.total(),
            _ => 0,
        }
    }

    pub fn to_proto(&self) -> ImageVerification {
        let (result, error, drift) = match &self.outcome {
            VerifyOutcome::Clean => ("clean", String::new(), None),
            VerifyOutcome::Drift(drift) => ("drift", String::new(), Some(drift)),
            VerifyOutcome::Error(error) => ("error", error.clone(), None),
        };
        let count = |kind| drift.map_or(0, |drift| drift.count(kind));
        ImageVerification {
            request_id: self.request_id.clone(),
            image: Some(self.image.to_proto()),
            started_at: self.started_at,
            duration_ms: u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            bytes_read: self.bytes_read,
            entries_checked: self.entries_checked,
            result: result.to_owned(),
            error,
            changed: count(DifferenceKind::Changed),
            added: count(DifferenceKind::Added),
            removed: count(DifferenceKind::Removed),
            mode_changed: count(DifferenceKind::ModeChanged),
            link_retargeted: count(DifferenceKind::LinkRetargeted),
            differences: drift
                .map(|drift| {
                    drift
                        .differences
                        .iter()
                        .map(|difference| ImageDifference {
                            path: difference.path.clone(),
                            kind: difference.kind.as_str().to_owned(),
                            detail: difference.detail.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            kept_tree: self
                .restore
                .as_ref()
                .and_then(|restore| restore.kept_tree.as_ref())
                .map(|path| path.display().to_string())
                .unwrap_or_default(),
            restore_message: self
                .restore
                .as_ref()
                .map(|restore| restore.message.clone())
                .unwrap_or_default(),
        }
    }
}

/// Indexes a freshly unpacked tree (before it is renamed into place) and
/// writes the index atomically at `index_path`. Blocking.
pub fn index_fresh_tree(
    tree: &Path,
    mutable: &[String],
    index_path: &Path,
) -> Result<(), index::IndexError> {
    let mut limiter = RateLimiter::unlimited();
    let (mut index, _) = walk_tree(
        tree,
        &mut WalkOptions {
            names: Names::Strict,
            skip: &[],
            limiter: &mut limiter,
        },
    )?;
    index.mutable = mutable.to_vec();
    write_index(index_path, &index)
}

/// Verifies the unpacked tree of `image` against its index. Blocking.
pub fn verify_tree(
    layout: &ImageLayout,
    image: &LocalImage,
    rate_bytes_per_second: u64,
    request_id: String,
) -> Verification {
    let started = std::time::Instant::now();
    let started_at = unix_now();
    let mut limiter = RateLimiter::new(rate_bytes_per_second);
    let tree = layout.image_dir(&image.digest);
    let walked = read_index(&layout.index_path(&image.digest)).and_then(|expected| {
        let walk = walk_tree(
            &tree,
            &mut WalkOptions {
                names: Names::Lossy,
                skip: &expected.mutable,
                limiter: &mut limiter,
            },
        );
        let (found, totals) = match walk {
            // The whole tree gone is drift (everything removed), not an error.
            Err(index::IndexError::Io { path, source })
                if path == tree && source.kind() == std::io::ErrorKind::NotFound =>
            {
                (index::ImageIndex::default(), index::WalkTotals::default())
            }
            other => other?,
        };
        Ok((compare(&expected, &found, &expected.mutable), found, totals))
    });
    let (outcome, bytes_read, entries_checked) = match walked {
        Ok((drift, found, totals)) => {
            let outcome = if drift.total() == 0 {
                VerifyOutcome::Clean
            } else {
                VerifyOutcome::Drift(drift)
            };
            (outcome, totals.bytes_read, found.entries.len() as u64)
        }
        Err(error) => (VerifyOutcome::Error(error.to_string()), 0, 0),
    };
    Verification {
        request_id,
        image: image.clone(),
        started_at,
        duration: started.elapsed(),
        bytes_read,
        entries_checked,
        outcome,
        restore: None,
    }
}

/// What the verifier needs of the swap manager: re-create the current
/// image's tree from its signed payload, through the journalled,
/// health-gated swap. The real one is `swap::ImageHandle`.
#[async_trait::async_trait]
pub trait ImageRestorer: Send + Sync {
    async fn restore(&self) -> RestoreOutcome;
}

enum Command {
    Verify { request_id: String },
    Restore { request_id: String },
}

/// What the session sees of the verifier.
#[derive(Debug, Clone)]
pub struct IntegrityHandle {
    commands: mpsc::Sender<Command>,
    results: watch::Receiver<Option<Arc<Verification>>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Verify { request_id } => write!(f, "verify {request_id}"),
            Command::Restore { request_id } => write!(f, "restore {request_id}"),
        }
    }
}

impl IntegrityHandle {
    /// Queues the server's command; false when the queue is full or the
    /// action unknown (the server's request then gets no answer and its
    /// caller says so).
    pub fn command(&self, command: &ImageCommand) -> bool {
        let request_id: String = command
            .request_id
            .chars()
            .take(MAX_REQUEST_ID_CHARS)
            .collect();
        let queued = match ImageAction::try_from(command.action) {
            Ok(ImageAction::Verify) => Command::Verify { request_id },
            Ok(ImageAction::Restore) => Command::Restore { request_id },
            _ => return false,
        };
        self.commands.try_send(queued).is_ok()
    }

    /// The latest verification (none before the first).
    pub fn results(&self) -> watch::Receiver<Option<Arc<Verification>>> {
        self.results.clone()
    }
}

/// `interval` moved by up to ±10 %, so a fleet started together does not
/// read its disks together.
fn jittered(interval: Duration) -> Duration {
    let mut bytes = [0u8; 2];
    let random = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map(|()| u16::from_le_bytes(bytes))
        .unwrap_or(u16::MAX / 2);
    let fraction = 0.9 + 0.2 * f64::from(random) / f64::from(u16::MAX);
    interval.mul_f64(fraction)
}

struct Verifier {
    settings: IntegritySettings,
    layout: ImageLayout,
    status: watch::Receiver<ImageStatus>,
    restorer: Arc<dyn ImageRestorer>,
    results: watch::Sender<Option<Arc<Verification>>>,
}

impl Verifier {
    fn current_image(&self) -> Option<LocalImage> {
        self.status
            .borrow()
            .current
            .as_ref()
            .map(LocalImage::from_proto)
    }

    async fn verify(&self, request_id: &str) -> Option<Verification> {
        let image = self.current_image()?;
        let layout = self.layout.clone();
        let rate = self.settings.rate_bytes_per_second;
        let request_id = request_id.to_owned();
        let failed_image = image.clone();
        let failed_id = request_id.clone();
        Some(
            tokio::task::spawn_blocking(move || verify_tree(&layout, &image, rate, request_id))
                .await
                .unwrap_or_else(|error| Verification {
                    request_id: failed_id,
                    image: failed_image,
                    started_at: unix_now(),
                    duration: Duration::ZERO,
                    bytes_read: 0,
                    entries_checked: 0,
                    outcome: VerifyOutcome::Error(format!("verification task failed: {error}")),
                    restore: None,
                }),
        )
    }

    async fn handle(&self, command: Command) {
        let (request_id, mut restore) = match command {
            Command::Verify { request_id } => (request_id, None),
            Command::Restore { request_id } => {
                tracing::info!(%request_id, "restoring the image on request");
                (request_id, Some(self.restorer.restore().await))
            }
        };
        let Some(mut verification) = self.verify(&request_id).await else {
            tracing::debug!("no committed image: nothing to verify");
            return;
        };
        if let VerifyOutcome::Drift(drift) = &verification.outcome {
            tracing::warn!(image = %verification.image.reference(), files = drift.total(), "image drift found");
            if restore.is_none() && self.settings.on_drift == OnDrift::Restore {
                // The drift is published first, so the server sees what was
                // found; without the request id: the answer is what follows.
                self.results.send_replace(Some(Arc::new(Verification {
                    request_id: String::new(),
                    ..verification.clone()
                })));
                let outcome = self.restorer.restore().await;
                restore = Some(outcome);
                if let Some(again) = self.verify(&request_id).await {
                    verification = again;
                }
            }
        }
        verification.restore = restore;
        self.results.send_replace(Some(Arc::new(verification)));
    }

    async fn run(self, mut commands: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        // Soon after start too: a restarted agent must not report a drifted
        // tree as clean for a whole interval.
        let mut next_periodic =
            Instant::now() + jittered(self.settings.interval.min(FIRST_VERIFICATION_AFTER));
        loop {
            let command = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(next_periodic) => {
                    next_periodic = Instant::now() + jittered(self.settings.interval);
                    Command::Verify { request_id: String::new() }
                }
                command = commands.recv() => match command {
                    Some(command) => command,
                    None => return,
                },
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.handle(command) => {}
            }
        }
    }
}

/// Starts the verifier; `status` is the swap manager's (it names the
/// current image).
pub fn start(
    settings: IntegritySettings,
    layout: ImageLayout,
    status: watch::Receiver<ImageStatus>,
    restorer: Arc<dyn ImageRestorer>,
    shutdown: CancellationToken,
) -> IntegrityHandle {
    let (commands, command_receiver) = mpsc::channel(COMMAND_QUEUE_DEPTH);
    let (results, results_receiver) = watch::channel(None);
    let verifier = Verifier {
        settings,
        layout,
        status,
        restorer,
        results,
    };
    tokio::spawn(verifier.run(command_receiver, shutdown));
    IntegrityHandle {
        commands,
        results: results_receiver,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_with_an_indexed_image() -> (ImageLayout, LocalImage) {
        let root = std::env::temp_dir().join(format!("flotte-verify-{}", uuid::Uuid::new_v4()));
        let layout = ImageLayout::new(&root);
        let image = LocalImage {
            name: "app".into(),
            version: "1.0.0".into(),
            digest: "c".repeat(64),
        };
        let tree = layout.image_dir(&image.digest);
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/app"), b"app").unwrap();
        std::fs::create_dir_all(tree.join("var")).unwrap();
        index_fresh_tree(
            &tree,
            &["var".to_owned()],
            &layout.index_path(&image.digest),
        )
        .unwrap();
        (layout, image)
    }

    #[test]
    fn a_tree_verifies_clean_then_drifted_then_wholly_removed() {
        let (layout, image) = layout_with_an_indexed_image();
        let tree = layout.image_dir(&image.digest);
        let clean = verify_tree(&layout, &image, 0, "r1".into());
        assert_eq!(clean.outcome, VerifyOutcome::Clean);
        assert_eq!(clean.bytes_read, 3);
        assert_eq!(clean.to_proto().result, "clean");

        std::fs::write(tree.join("var/cache"), b"mutable").unwrap();
        assert_eq!(
            verify_tree(&layout, &image, 0, String::new()).outcome,
            VerifyOutcome::Clean,
            "the manifest's mutable path is left out"
        );

        std::fs::write(tree.join("bin/app"), b"APP").unwrap();
        let drifted = verify_tree(&layout, &image, 0, "r2".into());
        assert_eq!(drifted.drift_files(), 1);
        let sent = drifted.to_proto();
        assert_eq!((sent.result.as_str(), sent.changed), ("drift", 1));
        assert_eq!(sent.differences[0].path, "bin/app");

        std::fs::remove_dir_all(&tree).unwrap();
        let gone = verify_tree(&layout, &image, 0, "r3".into());
        assert_eq!(
            gone.drift_files(),
            2,
            "bin and bin/app removed (var is mutable)"
        );

        std::fs::remove_file(layout.index_path(&image.digest)).unwrap();
        let unverifiable = verify_tree(&layout, &image, 0, "r4".into());
        assert!(matches!(unverifiable.outcome, VerifyOutcome::Error(_)));
        assert_eq!(unverifiable.to_proto().result, "error");
        std::fs::remove_dir_all(&layout.root).unwrap();
    }
}
