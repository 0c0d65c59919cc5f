//! Quarantine on the agent: when the desired state carries a quarantine,
//! run the configured `on_quarantine` hook (e.g. leave the load balancer),
//! stop the supervised service only if configured to, collect a forensic
//! bundle and upload it; when the quarantine is lifted, run `on_release` and
//! start the service again if we stopped it.
//!
//! What must never happen here: wiping, deleting or resetting anything on
//! the machine. A quarantined machine is kept *as it is* for investigation;
//! it stays enrolled and keeps its session and reports.
//!
//! Progress is persisted (`<data>/quarantine.json`) so that a restarted agent
//! neither runs a hook twice nor forgets to upload its bundle.

pub mod forensics;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotte_proto::v1::agent_session_client::AgentSessionClient;
use flotte_proto::v1::{ForensicsChunk, Quarantine};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::health::HealthReceiver;
use crate::identity::MachineIdentity;
use crate::image::service::Service;
use forensics::CollectionSources;

/// Bytes per upload message (well under the server's message limit).
const UPLOAD_CHUNK_BYTES: usize = 256 * 1024;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);
/// Longest the manager waits for a collection before it retries the
/// upload later (a read under /proc can hang with a process stuck on a
/// dead mount).
const COLLECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// A collection running on the blocking pool, for one quarantine.
struct Collection {
    quarantine_id: String,
    bundle: tokio::task::JoinHandle<std::io::Result<Vec<u8>>>,
}

/// Validated `[quarantine]` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuarantineSettings {
    pub on_quarantine: Option<Vec<String>>,
    pub on_release: Option<Vec<String>>,
    pub stop_service: bool,
    pub hook_timeout: Duration,
    /// The bundle's process list without command lines.
    pub omit_command_lines: bool,
}

/// The desired quarantine as the manager sees it: `None` until the first
/// desired state of this run arrived, then `Some(None)` (in service) or
/// `Some(Some(q))`.
type DesiredQuarantine = Option<Option<Quarantine>>;

/// What the session sees: it hands over the quarantine of each desired state.
#[derive(Debug, Clone)]
pub struct QuarantineHandle {
    desired: watch::Sender<DesiredQuarantine>,
}

impl QuarantineHandle {
    /// `None`: not quarantined (or released). The first call always counts,
    /// even with `None`: a quarantine lifted while the agent was stopped
    /// must still be released.
    pub fn desire(&self, quarantine: Option<Quarantine>) {
        self.desired.send_if_modified(|current| {
            let changed = match current {
                None => true,
                Some(known) => known.as_ref().map(|q| &q.id) != quarantine.as_ref().map(|q| &q.id),
            };
            if changed {
                *current = Some(quarantine);
            }
            changed
        });
    }
}

/// Persisted progress of the current quarantine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineProgress {
    /// The quarantine being served ("" when in service).
    pub id: String,
    pub hook_done: bool,
    pub service_stopped: bool,
    pub bundle_uploaded: bool,
}

/// What to do next for `desired` given `progress` (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    RunQuarantineHook,
    StopService,
    UploadBundle,
    /// Released: run on_release, restart the service if we stopped it.
    Release {
        restart_service: bool,
    },
    Idle,
}

pub fn next_step(
    desired: Option<&Quarantine>,
    progress: &QuarantineProgress,
    settings: &QuarantineSettings,
) -> Step {
    match desired {
        None if progress.id.is_empty() => Step::Idle,
        None => Step::Release {
            restart_service: progress.service_stopped,
        },
        // A new quarantine replaces an old one: start over with it.
        Some(quarantine) if quarantine.id != progress.id => Step::RunQuarantineHook,
        Some(_) if !progress.hook_done => Step::RunQuarantineHook,
        Some(_) if settings.stop_service && !progress.service_stopped => Step::StopService,
        Some(_) if !progress.bundle_uploaded => Step::UploadBundle,
        Some(_) => Step::Idle,
    }
}

fn progress_path(data_dir: &Path) -> PathBuf {
    data_dir.join("quarantine.json")
}

fn load_progress(data_dir: &Path) -> QuarantineProgress {
    std::fs::read(progress_path(data_dir))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn save_progress(data_dir: &Path, progress: &QuarantineProgress) {
    let written = serde_json::to_vec(progress)
        .map_err(std::io::Error::other)
        .and_then(|bytes| flotte_proto::files::write_atomically(&progress_path(data_dir), &bytes));
    if let Err(error) = written {
        tracing::error!(%error, "cannot persist quarantine progress");
    }
}

/// Bytes of a hook's standard error kept for the log; the rest is read and
/// dropped, so that a chatty hook neither fills the agent's memory nor
/// blocks on a full pipe.
const HOOK_STDERR_KEPT_BYTES: u64 = 16 * 1024;

/// Runs a hook with the quarantine in its environment; the start of its
/// standard error goes to the agent's log. A failing hook is logged, not
/// retried: hooks act on other systems, and running one twice may do harm.
async fn run_hook(
    name: &str,
    command: &[String],
    quarantine: Option<&Quarantine>,
    timeout: Duration,
) {
    let Some((program, args)) = command.split_first() else {
        return;
    };
    let mut process = tokio::process::Command::new(program);
    process
        .args(args)
        .env_remove(crate::image::service::JOIN_TOKEN_VARIABLE);
    if let Some(quarantine) = quarantine {
        process
            .env("FLOTTE_QUARANTINE_ID", &quarantine.id)
            .env("FLOTTE_QUARANTINE_REASON", &quarantine.reason)
            .env("FLOTTE_QUARANTINE_BY", &quarantine.by);
    }
    match tokio::time::timeout(timeout, run_keeping_stderr_start(process)).await {
        Ok(Ok((status, _))) if status.success() => {
            tracing::info!(hook = name, "hook ran");
        }
        Ok(Ok((status, stderr))) => tracing::error!(
            hook = name,
            %status,
            stderr = %String::from_utf8_lossy(&stderr).trim(),
            "hook failed"
        ),
        Ok(Err(error)) => tracing::error!(hook = name, %error, "cannot run hook"),
        Err(_) => tracing::error!(hook = name, ?timeout, "hook timed out and was killed"),
    }
}

/// Runs `process` to its end with no input and its output dropped but for
/// the first [`HOOK_STDERR_KEPT_BYTES`] of standard error. Killed if the
/// returned future is dropped (a timeout).
async fn run_keeping_stderr_start(
    mut process: tokio::process::Command,
) -> std::io::Result<(std::process::ExitStatus, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut child = process
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut kept = Vec::new();
    if let Some(mut stderr) = child.stderr.take() {
        (&mut stderr)
            .take(HOOK_STDERR_KEPT_BYTES)
            .read_to_end(&mut kept)
            .await?;
        tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await?;
    }
    Ok((child.wait().await?, kept))
}

/// Where the bundle goes: the server's `UploadForensics`.
#[async_trait::async_trait]
pub trait BundleSink: Send + Sync {
    async fn upload(&self, quarantine_id: &str, bundle: Vec<u8>) -> Result<(), String>;
}

/// Uploads over mutual TLS with the machine's identity, trying each server.
pub struct GrpcBundleSink {
    pub servers: Vec<String>,
    pub identity: watch::Receiver<MachineIdentity>,
}

#[async_trait::async_trait]
impl BundleSink for GrpcBundleSink {
    async fn upload(&self, quarantine_id: &str, bundle: Vec<u8>) -> Result<(), String> {
        let identity = self.identity.borrow().clone();
        let mut last_error = String::from("no server address");
        for address in &self.servers {
            let (channel, diagnostics) =
                crate::image::fetch::dial(address, &identity).map_err(|error| error.to_string())?;
            let mut chunks: Vec<ForensicsChunk> = bundle
                .chunks(UPLOAD_CHUNK_BYTES)
                .map(|data| ForensicsChunk {
                    quarantine_id: String::new(),
                    data: data.to_vec(),
                })
                .collect();
            match chunks.first_mut() {
                Some(first) => first.quarantine_id = quarantine_id.to_owned(),
                None => chunks.push(ForensicsChunk {
                    quarantine_id: quarantine_id.to_owned(),
                    data: Vec::new(),
                }),
            }
            match AgentSessionClient::new(channel)
                .upload_forensics(tokio_stream::iter(chunks))
                .await
            {
                Ok(answer) => {
                    tracing::info!(
                        quarantine = quarantine_id,
                        size = answer.get_ref().size,
                        "forensic bundle uploaded"
                    );
                    return Ok(());
                }
                // The server keeps the first bundle of a quarantine and refuses
                // later ones: ours is there (its answer was lost), so retrying
                // could never succeed.
                Err(status) if status.code() == tonic::Code::AlreadyExists => {
                    tracing::info!(
                        quarantine = quarantine_id,
                        message = status.message(),
                        "forensic bundle already stored"
                    );
                    return Ok(());
                }
                Err(status) => {
                    last_error = flotte_proto::transport::explain_status_with(&status, &diagnostics)
                }
            }
        }
        Err(last_error)
    }
}

/// Everything the manager needs.
pub struct QuarantineManager {
    pub settings: QuarantineSettings,
    pub data_dir: PathBuf,
    pub sources: CollectionSources,
    pub service: Service,
    pub health: HealthReceiver,
    pub sink: Arc<dyn BundleSink>,
    pub hostname: String,
}

/// Starts the manager task.
pub fn start(manager: QuarantineManager, shutdown: CancellationToken) -> QuarantineHandle {
    let (desired, receiver) = watch::channel(None::<Option<Quarantine>>);
    tokio::spawn(manager.run(receiver, shutdown));
    QuarantineHandle { desired }
}

impl QuarantineManager {
    async fn run(
        self,
        mut desired: watch::Receiver<DesiredQuarantine>,
        shutdown: CancellationToken,
    ) {
        let mut progress = load_progress(&self.data_dir);
        // Until the first desired state arrives we do not know whether the
        // quarantine still holds: do nothing rather than release by mistake.
        tokio::select! {
            () = shutdown.cancelled() => return,
            known = desired.wait_for(Option::is_some) => if known.is_err() { return },
        }
        let mut retry = FIRST_RETRY;
        let mut collecting = None;
        loop {
            let wanted = desired.borrow_and_update().clone().flatten();
            let step = next_step(wanted.as_ref(), &progress, &self.settings);
            let mut wait = None;
            match step {
                Step::RunQuarantineHook => {
                    let Some(quarantine) = wanted.as_ref() else {
                        continue;
                    };
                    tracing::warn!(id = %quarantine.id, reason = %quarantine.reason, by = %quarantine.by, "machine quarantined: taken out of service, kept for investigation");
                    progress = QuarantineProgress {
                        id: quarantine.id.clone(),
                        ..QuarantineProgress::default()
                    };
                    if let Some(command) = &self.settings.on_quarantine {
                        run_hook(
                            "on_quarantine",
                            command,
                            Some(quarantine),
                            self.settings.hook_timeout,
                        )
                        .await;
                    }
                    progress.hook_done = true;
                    save_progress(&self.data_dir, &progress);
                }
                Step::StopService => {
                    self.service.stop().await;
                    tracing::warn!("supervised service stopped (stop_service = true)");
                    progress.service_stopped = true;
                    save_progress(&self.data_dir, &progress);
                }
                Step::UploadBundle => {
                    let Some(quarantine) = wanted.as_ref() else {
                        continue;
                    };
                    match self.collect_and_upload(quarantine, &mut collecting).await {
                        Ok(()) => {
                            progress.bundle_uploaded = true;
                            save_progress(&self.data_dir, &progress);
                            retry = FIRST_RETRY;
                        }
                        Err(error) => {
                            tracing::warn!(%error, ?retry, "forensic upload failed; retrying");
                            wait = Some(retry);
                            retry = (retry * 2).min(MAX_RETRY);
                        }
                    }
                }
                Step::Release { restart_service } => {
                    tracing::info!(id = %progress.id, "quarantine lifted: back in service");
                    if let Some(command) = &self.settings.on_release {
                        run_hook("on_release", command, None, self.settings.hook_timeout).await;
                    }
                    if restart_service {
                        if let Err(error) = self
                            .service
                            .restart(current_service_spec(&self.data_dir).as_ref())
                            .await
                        {
                            tracing::error!(%error, "cannot restart the service after release");
                        }
                    }
                    progress = QuarantineProgress::default();
                    save_progress(&self.data_dir, &progress);
                }
                Step::Idle => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        changed = desired.changed() => if changed.is_err() { return },
                    }
                }
            }
            if let Some(wait) = wait {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = desired.changed() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    /// Collects (on the blocking pool) and uploads the bundle. A collection
    /// that outlives [`COLLECTION_TIMEOUT`] is kept in `collecting` and
    /// waited for again at the next attempt, never started twice.
    async fn collect_and_upload(
        &self,
        quarantine: &Quarantine,
        collecting: &mut Option<Collection>,
    ) -> Result<(), String> {
        let mut collection = match collecting.take() {
            Some(running) if running.quarantine_id == quarantine.id => running,
            _ => self.start_collection(quarantine),
        };
        let bundle = match tokio::time::timeout(COLLECTION_TIMEOUT, &mut collection.bundle).await {
            Ok(collected) => collected
                .map_err(|error| error.to_string())?
                .map_err(|error| error.to_string())?,
            Err(_) => {
                *collecting = Some(collection);
                return Err(format!(
                    "the forensic collection did not finish within {} s (a read is blocked); still waiting for it",
                    COLLECTION_TIMEOUT.as_secs()
                ));
            }
        };
        tracing::info!(size = bundle.len(), "forensic bundle collected");
        self.sink.upload(&quarantine.id, bundle).await
    }

    fn start_collection(&self, quarantine: &Quarantine) -> Collection {
        let snapshot = Arc::clone(&self.health.borrow());
        let sources = self.sources.clone();
        let now = u64::try_from(crate::clock::unix_now()).unwrap_or(0);
        let about = serde_json::json!({
            "quarantine_id": quarantine.id,
            "reason": quarantine.reason,
            "quarantined_by": quarantine.by,
            "since": quarantine.since,
            "hostname": self.hostname,
            "collected_at": now,
            "agent_version": env!("CARGO_PKG_VERSION"),
        });
        Collection {
            quarantine_id: quarantine.id.clone(),
            // Reading /proc and files is blocking work.
            bundle: tokio::task::spawn_blocking(move || {
                forensics::to_tar(&forensics::collect(&sources, &snapshot, about), now)
            }),
        }
    }
}

/// The service spec of the committed image, to start it again after a release.
fn current_service_spec(data_dir: &Path) -> Option<flotte_proto::image::ServiceSpec> {
    let layout = crate::image::layout::ImageLayout::new(data_dir);
    let current = layout.load_committed().ok()?.current?;
    let bytes = std::fs::read(
        layout
            .image_dir(&current.digest)
            .join(crate::image::swap::MANIFEST_COPY),
    )
    .ok()?;
    serde_json::from_slice::<flotte_proto::image::Manifest>(&bytes)
        .ok()?
        .service
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quarantine(id: &str) -> Quarantine {
        Quarantine {
            id: id.into(),
            reason: "r".into(),
            since: 1,
            by: "bob".into(),
        }
    }

    #[tokio::test]
    async fn a_hook_flooding_its_stderr_costs_a_bounded_buffer_and_still_ends() {
        let mut process = tokio::process::Command::new("sh");
        process.args([
            "-c",
            "echo first words >&2; head -c 8000000 /dev/zero >&2; exit 3",
        ]);
        let (status, stderr) =
            tokio::time::timeout(Duration::from_secs(60), run_keeping_stderr_start(process))
                .await
                .expect("the hook must not block on a full pipe")
                .expect("sh runs");
        assert_eq!(status.code(), Some(3));
        assert_eq!(stderr.len() as u64, HOOK_STDERR_KEPT_BYTES);
        assert!(stderr.starts_with(b"first words\n"));
    }

    #[test]
    fn the_first_desired_state_counts_even_without_a_quarantine() {
        let (sender, mut receiver) = watch::channel(None::<Option<Quarantine>>);
        let handle = QuarantineHandle { desired: sender };
        handle.desire(None);
        assert!(
            receiver.has_changed().unwrap(),
            "a release made while stopped must be seen"
        );
        assert_eq!(*receiver.borrow_and_update(), Some(None));
        handle.desire(None);
        assert!(
            !receiver.has_changed().unwrap(),
            "a re-sent state is not a change"
        );
        handle.desire(Some(quarantine("q1")));
        assert!(receiver.has_changed().unwrap());
        receiver.borrow_and_update();
        handle.desire(Some(Quarantine {
            reason: "other words".into(),
            ..quarantine("q1")
        }));
        assert!(!receiver.has_changed().unwrap(), "the same quarantine id");
    }

    #[test]
    fn steps_follow_the_quarantine_and_never_repeat_a_hook() {
        let stopping = QuarantineSettings {
            stop_service: true,
            ..QuarantineSettings::default()
        };
        let keeping = QuarantineSettings::default();
        let progress = |id: &str, hook: bool, stopped: bool, uploaded: bool| QuarantineProgress {
            id: id.into(),
            hook_done: hook,
            service_stopped: stopped,
            bundle_uploaded: uploaded,
        };
        let q1 = quarantine("q1");
        let cases = [
            (
                None,
                progress("", false, false, false),
                &keeping,
                Step::Idle,
            ),
            (
                Some(&q1),
                progress("", false, false, false),
                &keeping,
                Step::RunQuarantineHook,
            ),
            (
                Some(&q1),
                progress("q1", true, false, false),
                &keeping,
                Step::UploadBundle,
            ),
            (
                Some(&q1),
                progress("q1", true, false, false),
                &stopping,
                Step::StopService,
            ),
            (
                Some(&q1),
                progress("q1", true, true, false),
                &stopping,
                Step::UploadBundle,
            ),
            (
                Some(&q1),
                progress("q1", true, true, true),
                &stopping,
                Step::Idle,
            ),
            (
                Some(&q1),
                progress("q0", true, true, true),
                &stopping,
                Step::RunQuarantineHook,
            ),
            (
                None,
                progress("q1", true, true, true),
                &stopping,
                Step::Release {
                    restart_service: true,
                },
            ),
            (
                None,
                progress("q1", true, false, false),
                &keeping,
                Step::Release {
                    restart_service: false,
                },
            ),
        ];
        for (desired, progress, settings, expected) in cases {
            assert_eq!(
                next_step(desired, &progress, settings),
                expected,
                "{desired:?} {progress:?}"
            );
        }
    }
}
