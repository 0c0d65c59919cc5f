//! The swap manager: one task that owns the machine's image. It takes the
//! desired image from the session, and for a new one walks the journalled
//! steps — download, verify, unpack, switch, restart, verify health, commit —
//! or switches back and restarts the previous image when the new one fails.
//! Its status goes into every report.

use std::sync::Arc;
use std::time::Duration;

use flotte_proto::image::{verify_manifest, Manifest};
use flotte_proto::release_keys::ReleasePublicKey;
use flotte_proto::v1::{CheckResult, DesiredImage, ImageStatus, SwapStatus};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::disk;
use super::fetch::{download, ImageSource};
use super::gate::{verify, GateOutcome};
use super::integrity::{index_fresh_tree, ImageRestorer, RestoreOutcome};
use super::journal::{self, recovery_action, RecoveryAction, SwapJournal, SwapStep};
use super::layout::{Committed, ImageLayout, LocalImage};
use super::service::Service;
use super::unpack::{sync_tree, unpack_payload, UnpackPolicy};
use crate::clock::unix_now;
use crate::health::{validate_checks, CheckSpec};
use crate::session::ImageManager;

/// The signed manifest, kept inside the unpacked image (service and checks
/// of the previous image are needed again after a rollback or a restart).
pub(crate) const MANIFEST_COPY: &str = ".flotte-manifest.json";
/// Wait before retrying a download that failed for a transient reason.
const DOWNLOAD_RETRY_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ImageSettings {
    pub release_keys: Vec<ReleasePublicKey>,
    pub unpack: UnpackPolicy,
    /// Unpacked images kept on disk (current and previous always are).
    pub keep_images: usize,
    /// Time for the checks to become healthy after a switch.
    pub verify_deadline: Duration,
    /// Time they must then stay healthy before the swap is committed.
    pub soak: Duration,
    /// The agent's own checks, added to the image's.
    pub config_checks: Vec<CheckSpec>,
    /// A drifted tree replaced by a restore is kept for forensics (one at a
    /// time) unless it is larger than this.
    pub keep_drifted_max_bytes: u64,
}

/// What the session sees of the manager.
#[derive(Debug, Clone)]
pub struct ImageHandle {
    desired: watch::Sender<Option<(u64, DesiredImage)>>,
    status: watch::Receiver<ImageStatus>,
    restores: mpsc::Sender<oneshot::Sender<RestoreOutcome>>,
}

#[async_trait::async_trait]
impl ImageRestorer for ImageHandle {
    async fn restore(&self) -> RestoreOutcome {
        let (answer, outcome) = oneshot::channel();
        if self.restores.send(answer).await.is_err() {
            return RestoreOutcome {
                message: "the swap manager has stopped".to_owned(),
                ..RestoreOutcome::default()
            };
        }
        outcome.await.unwrap_or_else(|_| RestoreOutcome {
            message: "the swap manager stopped during the restore".to_owned(),
            ..RestoreOutcome::default()
        })
    }
}

impl ImageManager for ImageHandle {
    fn status(&self) -> watch::Receiver<ImageStatus> {
        self.status.clone()
    }

    fn desire(&self, version: u64, image: DesiredImage) {
        self.desired.send_if_modified(|current| {
            let changed = current.as_ref().is_none_or(|(known_version, known)| {
                *known_version != version || known.image != image.image
            });
            if changed {
                *current = Some((version, image));
            }
            changed
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum SwapError {
    #[error("refused before anything was changed: {0}")]
    Refused(String),
    #[error("{0}")]
    Transient(String),
    #[error("{step} failed: {reason}")]
    Step { step: &'static str, reason: String },
    /// The disk is full: retried in place until space is freed (see
    /// `image::disk`), never counted as the image's failure.
    #[error("{message}")]
    DiskFull { step: &'static str, message: String },
}

struct Manager {
    settings: ImageSettings,
    layout: ImageLayout,
    source: Arc<dyn ImageSource>,
    service: Service,
    status: watch::Sender<ImageStatus>,
    committed: Committed,
}

/// The error of `step` failing with `error`: a full disk of `data_dir`
/// apart from every other failure.
fn step_error(
    data_dir: &std::path::Path,
    step: SwapStep,
    error: &(dyn std::error::Error + 'static),
) -> SwapError {
    if disk::is_disk_full(error) {
        SwapError::DiskFull {
            step: step.as_str(),
            message: disk::describe_full_disk(data_dir, step.as_str()),
        }
    } else {
        SwapError::Step {
            step: step.as_str(),
            reason: error.to_string(),
        }
    }
}

impl Manager {
    /// Maps an I/O failure of `step` to its [`SwapError`].
    fn io_step(&self, step: SwapStep) -> impl Fn(std::io::Error) -> SwapError + '_ {
        move |error| step_error(&self.layout.root, step, &error)
    }

    fn publish(&self, swap: Option<SwapStatus>) {
        self.status.send_modify(|status| {
            status.current = self.committed.current.as_ref().map(LocalImage::to_proto);
            status.previous = self.committed.previous.as_ref().map(LocalImage::to_proto);
            if swap.is_some() {
                status.swap = swap;
            }
        });
    }

    fn progress(
        &self,
        target: &LocalImage,
        step: &str,
        outcome: &str,
        message: String,
        checks: Vec<CheckResult>,
    ) {
        self.publish(Some(SwapStatus {
            target: Some(target.to_proto()),
            step: step.to_owned(),
            outcome: outcome.to_owned(),
            message,
            bytes_downloaded: 0,
            updated_at: unix_now(),
            checks,
        }));
    }

    fn record(&self, journal: &mut SwapJournal, step: SwapStep) -> Result<(), SwapError> {
        journal.step = step;
        journal::record(&self.layout, journal).map_err(self.io_step(step))?;
        // One line per step: the log alone tells how long each step took.
        tracing::info!(image = %journal.target.reference(), step = step.as_str(), "swap step");
        self.progress(
            &journal.target,
            step.as_str(),
            "in_progress",
            String::new(),
            Vec::new(),
        );
        Ok(())
    }

    fn checks_for(&self, manifest: Option<&Manifest>) -> Vec<CheckSpec> {
        let mut problems = Vec::new();
        let mut checks = manifest
            .map(|manifest| validate_checks(manifest.checks.clone(), &mut problems))
            .unwrap_or_default();
        if !problems.is_empty() {
            tracing::warn!(
                ?problems,
                "the image declares invalid checks; they are ignored"
            );
        }
        checks.extend(self.settings.config_checks.iter().cloned());
        checks
    }

    fn manifest_of(&self, image: &LocalImage) -> Option<Manifest> {
        let bytes = std::fs::read(self.layout.image_dir(&image.digest).join(MANIFEST_COPY)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Finishes or undoes a swap interrupted by a crash.
    async fn recover(&mut self) -> std::io::Result<()> {
        let Some(journal) = journal::load(&self.layout)? else {
            return Ok(());
        };
        let action = recovery_action(journal.step);
        tracing::warn!(step = journal.step.as_str(), ?action, target = %journal.target.reference(), "recovering an interrupted swap");
        match action {
            RecoveryAction::Discard => {}
            RecoveryAction::FinishCommit => {
                self.committed = Committed {
                    current: Some(journal.target.clone()),
                    previous: journal.previous.clone(),
                };
                self.layout.save_committed(&self.committed)?;
            }
            RecoveryAction::RollBack => match &journal.previous {
                Some(previous) => self.layout.switch_current(&previous.digest)?,
                None => {
                    let _ = std::fs::remove_file(self.layout.current_link());
                }
            },
        }
        journal::clear(&self.layout)?;
        let message = match action {
            RecoveryAction::Discard => "agent restarted before the switch; attempt dropped",
            RecoveryAction::FinishCommit => "agent restarted while committing; commit finished",
            RecoveryAction::RollBack => {
                "agent restarted before the new image was proven healthy; switched back"
            }
        };
        let outcome = if action == RecoveryAction::FinishCommit {
            "committed"
        } else {
            "failed"
        };
        self.progress(
            &journal.target,
            "recovered",
            outcome,
            message.to_owned(),
            Vec::new(),
        );
        Ok(())
    }

    /// The signed manifest of `desired`, verified against this agent's own
    /// release keys and checked to describe the requested payload.
    fn verified_target(&self, desired: &DesiredImage) -> Result<(Manifest, LocalImage), SwapError> {
        let manifest = verify_manifest(
            &desired.manifest_json,
            &desired.signature,
            &self.settings.release_keys,
        )
        .map_err(|error| SwapError::Refused(error.to_string()))?;
        let wanted = desired.image.clone().unwrap_or_default();
        if manifest.payload_sha256 != wanted.digest || manifest.payload_size != desired.size {
            return Err(SwapError::Refused(format!(
                "the signed manifest describes {} ({} bytes), not the requested {} ({} bytes)",
                manifest.payload_sha256, manifest.payload_size, wanted.digest, desired.size
            )));
        }
        let target = LocalImage {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            digest: manifest.payload_sha256.clone(),
        };
        Ok((manifest, target))
    }

    /// Downloads the payload of `target` (resuming), then unpacks it into
    /// its staging directory with the manifest copy and the file index, all
    /// synced; returns the staging directory. The journal records each step.
    async fn fetch_and_stage(
        &self,
        journal: &mut SwapJournal,
        manifest: &Manifest,
        desired: &DesiredImage,
    ) -> Result<std::path::PathBuf, SwapError> {
        let target = journal.target.clone();
        self.record(journal, SwapStep::Downloading)?;
        let status = self.status.clone();
        let progress_target = target.to_proto();
        let mut progress = move |bytes: u64| {
            status.send_modify(|status| {
                if let Some(swap) = status.swap.as_mut() {
                    if swap.target.as_ref() == Some(&progress_target) {
                        swap.bytes_downloaded = bytes;
                    }
                }
            });
        };
        let payload = download(
            self.source.as_ref(),
            &self.layout,
            &target.digest,
            desired.size,
            &mut progress,
        )
        .await
        .map_err(|error| match error {
            super::fetch::FetchError::DigestMismatch { .. }
            | super::fetch::FetchError::SizeMismatch { .. } => {
                SwapError::Refused(error.to_string())
            }
            ref other if disk::is_disk_full(other) => {
                step_error(&self.layout.root, SwapStep::Downloading, other)
            }
            other => SwapError::Transient(other.to_string()),
        })?;
        // The payload's SHA-256 was checked while downloading.
        self.record(journal, SwapStep::VerifyingPayload)?;
        self.record(journal, SwapStep::Unpacking)?;
        let staging = self
            .layout
            .images_dir()
            .join(format!(".staging-{}", target.digest));
        let _ = super::unpack::remove_unpacked_tree(&staging);
        let policy = self.settings.unpack.clone();
        let manifest_json = desired.manifest_json.clone();
        let mutable = manifest.mutable_paths.clone();
        let index_path = self.layout.index_path(&target.digest);
        let staged = staging.clone();
        let data_dir = self.layout.root.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SwapError> {
            // A refused payload is never used again: its bytes go with the
            // tree half made from it, so refusals cannot fill the disk. A
            // full disk refuses nothing: the half-made tree goes, the
            // verified payload stays for the next attempt.
            let refuse = |error: &(dyn std::error::Error + 'static), reason: String| {
                let _ = super::unpack::remove_unpacked_tree(&staging);
                if disk::is_disk_full(error) {
                    return step_error(&data_dir, SwapStep::Unpacking, error);
                }
                let _ = std::fs::remove_file(&payload);
                SwapError::Refused(reason)
            };
            unpack_payload(&payload, &staging, &policy)
                .map_err(|error| refuse(&error, error.to_string()))?;
            // create_new: a payload carrying this name (maybe as a link) is refused.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(staging.join(MANIFEST_COPY))
                .and_then(|mut file| std::io::Write::write_all(&mut file, &manifest_json))
                .map_err(|error| {
                    refuse(
                        &error,
                        format!("cannot keep the manifest beside the image: {error}"),
                    )
                })?;
            // Indexed here, while the tree is the payload's alone.
            index_fresh_tree(&staging, &mutable, &index_path)
                .map_err(|error| refuse(&error, format!("cannot index the image: {error}")))?;
            sync_tree(&staging)
                .map_err(|error| step_error(&data_dir, SwapStep::Unpacking, &error))?;
            let _ = std::fs::remove_file(&payload);
            Ok(())
        })
        .await
        .map_err(|error| SwapError::Transient(error.to_string()))??;
        Ok(staged)
    }

    async fn swap(&mut self, version: u64, desired: &DesiredImage) -> Result<(), SwapError> {
        let (manifest, target) = self.verified_target(desired)?;
        if let Some(current) = &self.committed.current {
            let newer = semver::Version::parse(&target.version)
                .ok()
                .zip(semver::Version::parse(&current.version).ok())
                .is_none_or(|(target_version, current_version)| target_version >= current_version);
            if current.name == target.name && !newer && !desired.rollback {
                return Err(SwapError::Refused(format!(
                    "{} is older than the committed {}; a downgrade must be marked as a rollback",
                    target.reference(),
                    current.reference()
                )));
            }
        }
        let mut journal = SwapJournal {
            target: target.clone(),
            previous: self.committed.current.clone(),
            step: SwapStep::Downloading,
            desired_version: version,
            started_at: unix_now(),
        };
        let image_dir = self.layout.image_dir(&target.digest);
        if !image_dir.exists() {
            let staging = self
                .fetch_and_stage(&mut journal, &manifest, desired)
                .await?;
            std::fs::rename(&staging, &image_dir).map_err(self.io_step(SwapStep::Unpacking))?;
        }
        self.record(&mut journal, SwapStep::Switching)?;
        self.layout
            .switch_current(&target.digest)
            .map_err(self.io_step(SwapStep::Switching))?;
        let outcome = self.restart_and_gate(&mut journal, &manifest).await?;
        match outcome {
            GateOutcome::Passed => {
                // The new image runs and proved healthy: a full disk now
                // must not undo that, so the commit waits for space in
                // place (the journal still says "verifying": an agent
                // killed meanwhile rolls back, consistently).
                loop {
                    match self.commit(&mut journal, &target) {
                        Ok(()) => break,
                        Err(SwapError::DiskFull { step, message }) => {
                            tracing::warn!(%message, "cannot commit the swap");
                            self.progress(&target, step, "in_progress", message, Vec::new());
                            tokio::time::sleep(DOWNLOAD_RETRY_DELAY).await;
                        }
                        Err(other) => return Err(other),
                    }
                }
                let keep: Vec<&str> = [
                    Some(target.digest.as_str()),
                    journal.previous.as_ref().map(|p| p.digest.as_str()),
                ]
                .into_iter()
                .flatten()
                .collect();
                if let Err(error) = self
                    .layout
                    .collect_garbage(&keep, self.settings.keep_images)
                {
                    tracing::warn!(%error, "image garbage collection failed");
                }
                tracing::info!(image = %target.reference(), "swap committed");
                self.progress(
                    &target,
                    "committed",
                    "committed",
                    format!("{} committed", target.reference()),
                    Vec::new(),
                );
                Ok(())
            }
            GateOutcome::Failed { reason, checks } => {
                self.record(&mut journal, SwapStep::RollingBack)?;
                tracing::warn!(image = %target.reference(), %reason, "new image failed its checks; rolling back");
                let rollback_note = self.roll_back(journal.previous.as_ref()).await;
                journal::clear(&self.layout).map_err(self.io_step(SwapStep::RollingBack))?;
                self.progress(
                    &target,
                    "rolled_back",
                    "failed",
                    format!("{reason}; {rollback_note}"),
                    checks,
                );
                Ok(())
            }
        }
    }

    /// Records `target` as the committed image and clears the journal.
    fn commit(&mut self, journal: &mut SwapJournal, target: &LocalImage) -> Result<(), SwapError> {
        self.record(journal, SwapStep::Committing)?;
        let committed = Committed {
            current: Some(target.clone()),
            previous: journal.previous.clone(),
        };
        self.layout
            .save_committed(&committed)
            .map_err(self.io_step(SwapStep::Committing))?;
        self.committed = committed;
        journal::clear(&self.layout).map_err(self.io_step(SwapStep::Committing))?;
        Ok(())
    }

    /// Restarts the service of `manifest`'s image and runs the health gate.
    async fn restart_and_gate(
        &self,
        journal: &mut SwapJournal,
        manifest: &Manifest,
    ) -> Result<GateOutcome, SwapError> {
        self.record(journal, SwapStep::Restarting)?;
        let restarted = self.service.restart(manifest.service.as_ref()).await;
        self.record(journal, SwapStep::Verifying)?;
        Ok(match restarted {
            Err(error) => GateOutcome::Failed {
                reason: error.to_string(),
                checks: Vec::new(),
            },
            Ok(()) => {
                verify(
                    &self.checks_for(Some(manifest)),
                    self.settings.verify_deadline,
                    self.settings.soak,
                )
                .await
            }
        })
    }

    /// Re-creates the committed image's tree from its signed payload and
    /// swaps it in with the journalled, health-gated steps of any swap: the
    /// fresh tree is exchanged atomically with the drifted one
    /// (`renameat2(RENAME_EXCHANGE)`, so `images/<digest>` always exists),
    /// the service restarted and checked; the drifted tree is kept as
    /// `images/.drifted-<digest>` (the previous one kept is removed first)
    /// unless it is larger than the bound. If the fresh tree fails its
    /// checks, the drifted one is exchanged back and restarted.
    async fn restore(&mut self, desired: Option<&(u64, DesiredImage)>) -> RestoreOutcome {
        let failed = |message: String| RestoreOutcome {
            restored: false,
            message,
            kept_tree: None,
        };
        let Some(current) = self.committed.current.clone() else {
            return failed("no committed image to restore".to_owned());
        };
        let Some((version, desired)) = desired.filter(|(_, desired)| {
            desired
                .image
                .as_ref()
                .is_some_and(|image| image.digest == current.digest)
        }) else {
            return failed(format!(
                "the server's desired image is not the committed {}; the pending swap replaces the tree instead",
                current.reference()
            ));
        };
        match self.restore_steps(*version, desired, &current).await {
            Ok(outcome) => outcome,
            Err(error) => {
                let _ = journal::clear(&self.layout);
                let outcome = failed(format!(
                    "restore of {} failed: {error}",
                    current.reference()
                ));
                self.progress(
                    &current,
                    "restore_failed",
                    "failed",
                    outcome.message.clone(),
                    Vec::new(),
                );
                outcome
            }
        }
    }

    async fn restore_steps(
        &mut self,
        version: u64,
        desired: &DesiredImage,
        current: &LocalImage,
    ) -> Result<RestoreOutcome, SwapError> {
        let (manifest, target) = self.verified_target(desired)?;
        let mut journal = SwapJournal {
            target: target.clone(),
            // A crash after the exchange switches "back" to the same digest:
            // the machine stays on its committed image, whichever tree.
            previous: Some(current.clone()),
            step: SwapStep::Downloading,
            desired_version: version,
            started_at: unix_now(),
        };
        let staging = self
            .fetch_and_stage(&mut journal, &manifest, desired)
            .await?;
        self.record(&mut journal, SwapStep::Switching)?;
        let image_dir = self.layout.image_dir(&target.digest);
        // `staging` now holds the drifted tree, if there was one left.
        let drifted_kept =
            exchange_trees(&staging, &image_dir).map_err(self.io_step(SwapStep::Switching))?;
        let outcome = self.restart_and_gate(&mut journal, &manifest).await?;
        if let GateOutcome::Failed { reason, checks } = outcome {
            self.record(&mut journal, SwapStep::RollingBack)?;
            let back = if drifted_kept {
                exchange_trees(&staging, &image_dir).map(|_| ())
            } else {
                Err(std::io::Error::other("the drifted tree was gone"))
            };
            let restarted = self.service.restart(manifest.service.as_ref()).await;
            let _ = super::unpack::remove_unpacked_tree(&staging);
            journal::clear(&self.layout).map_err(self.io_step(SwapStep::RollingBack))?;
            let message = format!(
                "the restored tree failed its checks ({reason}); {}",
                match (back, restarted) {
                    (Ok(()), Ok(())) => "the drifted tree is back in place".to_owned(),
                    (Err(error), _) => format!("putting the drifted tree back failed: {error}"),
                    (_, Err(error)) => format!("restarting the drifted tree failed: {error}"),
                }
            );
            self.progress(&target, "restore_failed", "failed", message.clone(), checks);
            return Ok(RestoreOutcome {
                restored: false,
                message,
                kept_tree: None,
            });
        }
        self.record(&mut journal, SwapStep::Committing)?;
        journal::clear(&self.layout).map_err(self.io_step(SwapStep::Committing))?;
        let kept = if drifted_kept {
            self.keep_drifted(&staging, &target.digest).await
        } else {
            Err(std::io::Error::other("the image tree was gone entirely"))
        };
        let message = match &kept {
            Ok(Some(path)) => format!(
                "{} restored; drifted tree kept at {}",
                target.reference(),
                path.display()
            ),
            Ok(None) => format!(
                "{} restored; drifted tree removed (larger than {} bytes)",
                target.reference(),
                self.settings.keep_drifted_max_bytes
            ),
            Err(error) => format!(
                "{} restored; keeping the drifted tree failed: {error}",
                target.reference()
            ),
        };
        tracing::info!(image = %target.reference(), %message, "image restored");
        self.progress(
            &target,
            "restored",
            "committed",
            message.clone(),
            Vec::new(),
        );
        Ok(RestoreOutcome {
            restored: true,
            message,
            kept_tree: kept.ok().flatten(),
        })
    }

    /// Moves the drifted tree to the one forensic slot, or removes it when
    /// it is over the size bound.
    async fn keep_drifted(
        &self,
        drifted: &std::path::Path,
        digest: &str,
    ) -> std::io::Result<Option<std::path::PathBuf>> {
        let images = self.layout.images_dir();
        let slot = self.layout.drifted_dir(digest);
        let drifted = drifted.to_owned();
        let limit = self.settings.keep_drifted_max_bytes;
        tokio::task::spawn_blocking(move || {
            // One kept tree at a time, whatever image it came from.
            for entry in std::fs::read_dir(&images)? {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with(".drifted-") {
                    super::unpack::remove_unpacked_tree(&entry.path())?;
                }
            }
            if tree_size(&drifted, limit)? > limit {
                super::unpack::remove_unpacked_tree(&drifted)?;
                return Ok(None);
            }
            std::fs::rename(&drifted, &slot)?;
            Ok(Some(slot))
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Switches back to `previous`, restarts it and checks it is healthy.
    async fn roll_back(&mut self, previous: Option<&LocalImage>) -> String {
        let Some(previous) = previous else {
            let _ = std::fs::remove_file(self.layout.current_link());
            self.service.stop().await;
            return "no previous image: service stopped".to_owned();
        };
        if let Err(error) = self.layout.switch_current(&previous.digest) {
            return format!("switching back to {} failed: {error}", previous.reference());
        }
        let manifest = self.manifest_of(previous);
        if let Err(error) = self
            .service
            .restart(manifest.as_ref().and_then(|m| m.service.as_ref()))
            .await
        {
            return format!("restarting {} failed: {error}", previous.reference());
        }
        match verify(
            &self.checks_for(manifest.as_ref()),
            self.settings.verify_deadline,
            Duration::ZERO,
        )
        .await
        {
            GateOutcome::Passed => format!("back on {}, healthy", previous.reference()),
            GateOutcome::Failed { reason, .. } => format!(
                "back on {}, but it is not healthy either: {reason}",
                previous.reference()
            ),
        }
    }

    async fn run(
        mut self,
        mut desired: watch::Receiver<Option<(u64, DesiredImage)>>,
        mut restores: mpsc::Receiver<oneshot::Sender<RestoreOutcome>>,
        shutdown: CancellationToken,
    ) {
        if let Err(error) = self.recover().await {
            tracing::error!(%error, "cannot recover the swap journal");
        }
        self.publish(None);
        if let Some(current) = self.committed.current.clone() {
            let manifest = self.manifest_of(&current);
            if let Err(error) = self
                .service
                .restart(manifest.as_ref().and_then(|m| m.service.as_ref()))
                .await
            {
                tracing::error!(%error, "cannot start the service of the committed image");
            }
        }
        // (desired-state version, digest) of the last attempt that ended, so a
        // failed image is not retried until the desired state changes.
        let mut finished: Option<(u64, String)> = None;
        loop {
            let wanted = desired.borrow_and_update().clone();
            if let Some((version, image)) = wanted {
                let digest = image
                    .image
                    .as_ref()
                    .map(|i| i.digest.clone())
                    .unwrap_or_default();
                let is_current = self
                    .committed
                    .current
                    .as_ref()
                    .is_some_and(|c| c.digest == digest);
                let already_tried = finished.as_ref() == Some(&(version, digest.clone()));
                if !is_current && !already_tried && !digest.is_empty() {
                    let result = tokio::select! {
                        () = shutdown.cancelled() => return,
                        result = self.swap(version, &image) => result,
                    };
                    match result {
                        Ok(()) => finished = Some((version, digest)),
                        Err(error @ (SwapError::Transient(_) | SwapError::DiskFull { .. })) => {
                            let step = match &error {
                                SwapError::DiskFull { step, .. } => *step,
                                _ => SwapStep::Downloading.as_str(),
                            };
                            let reason = error.to_string();
                            tracing::warn!(%reason, step, "image swap interrupted; retrying");
                            let target = image
                                .image
                                .clone()
                                .map(|i| LocalImage::from_proto(&i))
                                .unwrap_or_default();
                            self.progress(&target, step, "in_progress", reason, Vec::new());
                            tokio::select! {
                                () = shutdown.cancelled() => return,
                                () = tokio::time::sleep(DOWNLOAD_RETRY_DELAY) => {}
                            }
                            continue;
                        }
                        Err(error) => {
                            tracing::error!(%error, "swap failed");
                            let target = image
                                .image
                                .clone()
                                .map(|i| LocalImage::from_proto(&i))
                                .unwrap_or_default();
                            let _ = journal::clear(&self.layout);
                            self.progress(
                                &target,
                                "refused",
                                "failed",
                                error.to_string(),
                                Vec::new(),
                            );
                            finished = Some((version, digest));
                        }
                    }
                    continue;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = desired.changed() => if changed.is_err() { return },
                request = restores.recv() => {
                    let Some(answer) = request else { return };
                    let wanted = desired.borrow().clone();
                    let outcome = tokio::select! {
                        () = shutdown.cancelled() => return,
                        outcome = self.restore(wanted.as_ref()) => outcome,
                    };
                    // The verifier may have given up waiting: nothing to tell then.
                    let _ = answer.send(outcome);
                }
            }
        }
    }
}

/// Swaps two directories atomically (both keep existing throughout); when
/// `other` is gone, moves `one` there instead. Whether `one` now holds what
/// `other` held.
fn exchange_trees(one: &std::path::Path, other: &std::path::Path) -> std::io::Result<bool> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    let exchanged = match renameat2(AT_FDCWD, one, AT_FDCWD, other, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => true,
        Err(nix::errno::Errno::ENOENT) if std::fs::symlink_metadata(other).is_err() => {
            std::fs::rename(one, other)?;
            false
        }
        Err(errno) => return Err(std::io::Error::from(errno)),
    };
    if let Some(parent) = other.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(exchanged)
}

/// Bytes of regular files under `root`, never following a symlink; stops
/// counting once past `limit`.
fn tree_size(root: &std::path::Path, limit: u64) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut pending = vec![root.to_owned()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory)? {
            let entry = entry?;
            let metadata = entry.metadata()?;
            if metadata.is_dir() {
                pending.push(entry.path());
            } else if metadata.is_file() {
                total = total.saturating_add(metadata.len());
                if total > limit {
                    return Ok(total);
                }
            }
        }
    }
    Ok(total)
}

/// Starts the manager; it recovers any interrupted swap first.
pub fn start(
    settings: ImageSettings,
    layout: ImageLayout,
    source: Arc<dyn ImageSource>,
    service: Service,
    shutdown: CancellationToken,
) -> std::io::Result<ImageHandle> {
    layout.ensure_dirs()?;
    let committed = layout.load_committed()?;
    let (desired_sender, desired_receiver) = watch::channel(None);
    let (restores, restore_receiver) = mpsc::channel(1);
    let (status_sender, status_receiver) = watch::channel(ImageStatus {
        current: committed.current.as_ref().map(LocalImage::to_proto),
        previous: committed.previous.as_ref().map(LocalImage::to_proto),
        swap: None,
    });
    let manager = Manager {
        settings,
        layout,
        source,
        service,
        status: status_sender,
        committed,
    };
    tokio::spawn(manager.run(desired_receiver, restore_receiver, shutdown));
    Ok(ImageHandle {
        desired: desired_sender,
        status: status_receiver,
        restores,
    })
}
