//! The service an image provides: either supervised by the agent (command
//! from the agent config or the image manifest, run from `images/current`,
//! output to a size-bounded log, restarted if it dies) or restarted through a
//! configured command (e.g. `systemctl restart app`, whose unit runs from
//! `current/`).

use std::path::PathBuf;
use std::time::Duration;

use flotte_proto::image::ServiceSpec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How long a stopping service gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Wait before restarting a supervised service that exited by itself.
const CRASH_RESTART_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceMode {
    /// The agent runs the command (config override, else the manifest's).
    Supervised {
        command_override: Option<Vec<String>>,
        log_path: PathBuf,
        log_max_bytes: u64,
    },
    /// The agent runs this command to restart a service managed elsewhere.
    RestartCommand(Vec<String>),
    /// Images carry files only.
    Unmanaged,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot start the service {command:?}: {source}")]
    Start {
        command: String,
        source: std::io::Error,
    },
    #[error("restart command {command:?} failed: {reason}")]
    RestartCommand { command: String, reason: String },
    #[error("the service supervisor is gone")]
    SupervisorGone,
}

/// A command line and its environment.
type ServiceCommand = (Vec<String>, Vec<(String, String)>);

enum Request {
    Run {
        command: Vec<String>,
        environment: Vec<(String, String)>,
        done: oneshot::Sender<Result<(), ServiceError>>,
    },
    Stop {
        done: oneshot::Sender<()>,
    },
}

/// Handle to the service of the current image.
#[derive(Debug, Clone)]
pub struct Service {
    mode: ServiceMode,
    run_directory: PathBuf,
    requests: Option<mpsc::Sender<Request>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Run { .. } => "Run",
            Request::Stop { .. } => "Stop",
        })
    }
}

impl Service {
    /// `run_directory` is the `current` symlink: a restarted service runs
    /// whatever it points at.
    pub fn start(mode: ServiceMode, run_directory: PathBuf, shutdown: CancellationToken) -> Self {
        let requests = match &mode {
            ServiceMode::Supervised {
                log_path,
                log_max_bytes,
                ..
            } => {
                let (sender, receiver) = mpsc::channel(4);
                tokio::spawn(supervise(
                    receiver,
                    run_directory.clone(),
                    log_path.clone(),
                    *log_max_bytes,
                    shutdown,
                ));
                Some(sender)
            }
            _ => None,
        };
        Service {
            mode,
            run_directory,
            requests,
        }
    }

    /// (Re)starts the service for the image now in `current`.
    pub async fn restart(
        &self,
        manifest_service: Option<&ServiceSpec>,
    ) -> Result<(), ServiceError> {
        match &self.mode {
            ServiceMode::Unmanaged => Ok(()),
            ServiceMode::RestartCommand(command) => {
                run_restart_command(command, &self.run_directory).await
            }
            ServiceMode::Supervised {
                command_override, ..
            } => {
                let (command, environment) = match (command_override, manifest_service) {
                    (Some(command), _) => (command.clone(), Vec::new()),
                    (None, Some(spec)) => (
                        spec.command.clone(),
                        spec.environment.clone().into_iter().collect(),
                    ),
                    (None, None) => {
                        // An image without a service: stop the previous one.
                        self.stop().await;
                        return Ok(());
                    }
                };
                let (done, answer) = oneshot::channel();
                self.send(Request::Run {
                    command,
                    environment,
                    done,
                })
                .await?;
                answer.await.map_err(|_| ServiceError::SupervisorGone)?
            }
        }
    }

    pub async fn stop(&self) {
        let (done, answer) = oneshot::channel();
        if self.send(Request::Stop { done }).await.is_ok() {
            let _ = answer.await;
        }
    }

    async fn send(&self, request: Request) -> Result<(), ServiceError> {
        match &self.requests {
            Some(requests) => requests
                .send(request)
                .await
                .map_err(|_| ServiceError::SupervisorGone),
            None => Ok(()),
        }
    }
}

async fn run_restart_command(
    command: &[String],
    directory: &std::path::Path,
) -> Result<(), ServiceError> {
    let display = command.join(" ");
    let Some((program, arguments)) = command.split_first() else {
        return Ok(());
    };
    let output = Command::new(program)
        .args(arguments)
        .current_dir(directory)
        .output()
        .await
        .map_err(|error| ServiceError::RestartCommand {
            command: display.clone(),
            reason: error.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ServiceError::RestartCommand {
            command: display,
            reason: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

/// Resolves a relative program path against the image root.
fn program_path(run_directory: &std::path::Path, program: &str) -> PathBuf {
    if program.contains('/') && !program.starts_with('/') {
        run_directory.join(program)
    } else {
        PathBuf::from(program)
    }
}

fn spawn(
    run_directory: &std::path::Path,
    command: &[String],
    environment: &[(String, String)],
) -> Result<Child, ServiceError> {
    let display = command.join(" ");
    let Some((program, arguments)) = command.split_first() else {
        return Err(ServiceError::Start {
            command: display,
            source: std::io::Error::other("empty command"),
        });
    };
    Command::new(program_path(run_directory, program))
        .args(arguments)
        .envs(environment.iter().cloned())
        .current_dir(run_directory)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ServiceError::Start {
            command: display,
            source,
        })
}

/// Appends a child's output to the log, rotating it to `.1` past `max_bytes`.
async fn copy_to_log(mut output: impl AsyncRead + Unpin, log_path: PathBuf, max_bytes: u64) {
    let mut buffer = [0u8; 8192];
    loop {
        let read = match output.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let size = tokio::fs::metadata(&log_path).await.map_or(0, |m| m.len());
        if size + read as u64 > max_bytes {
            let _ = tokio::fs::rename(&log_path, log_path.with_extension("log.1")).await;
        }
        if let Ok(mut file) = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .await
        {
            let _ = file.write_all(&buffer[..read]).await;
        }
    }
}

async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        let group = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _ = child.wait().await;
}

/// Where the supervised service's process id is kept, so that a restarted
/// agent can stop the service an earlier (killed) agent left running.
fn pid_file(log_path: &std::path::Path) -> PathBuf {
    log_path.with_extension("pid")
}

/// Stops a service left running by an agent that was killed: its process
/// group, but only if that process still runs from our images directory (a
/// recycled pid belongs to someone else).
async fn stop_orphan(pid_path: &std::path::Path, images_dir: &std::path::Path) {
    let Some(pid) = std::fs::read_to_string(pid_path)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
    else {
        return;
    };
    let ours =
        std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(images_dir));
    if ours {
        tracing::warn!(pid, "stopping the service left running by a previous agent");
        let group = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    }
    let _ = std::fs::remove_file(pid_path);
}

async fn supervise(
    mut requests: mpsc::Receiver<Request>,
    run_directory: PathBuf,
    log_path: PathBuf,
    log_max_bytes: u64,
    shutdown: CancellationToken,
) {
    let pid_path = pid_file(&log_path);
    if let Some(images_dir) = run_directory.parent() {
        stop_orphan(&pid_path, images_dir).await;
    }
    let mut child: Option<Child> = None;
    let mut wanted: Option<ServiceCommand> = None;
    let start = |command: &[String],
                 environment: &[(String, String)]|
     -> Result<Child, ServiceError> {
        let mut started = spawn(&run_directory, command, environment)?;
        if let Some(pid) = started.id() {
            let _ = flotte_proto::files::write_atomically(&pid_path, format!("{pid}\n").as_bytes());
        }
        if let Some(stdout) = started.stdout.take() {
            tokio::spawn(copy_to_log(stdout, log_path.clone(), log_max_bytes));
        }
        if let Some(stderr) = started.stderr.take() {
            tokio::spawn(copy_to_log(stderr, log_path.clone(), log_max_bytes));
        }
        Ok(started)
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                if let Some(mut running) = child.take() {
                    stop_child(&mut running).await;
                }
                return;
            }
            request = requests.recv() => match request {
                None => return,
                Some(Request::Stop { done }) => {
                    wanted = None;
                    if let Some(mut running) = child.take() {
                        stop_child(&mut running).await;
                    }
                    let _ = done.send(());
                }
                Some(Request::Run { command, environment, done }) => {
                    if let Some(mut running) = child.take() {
                        stop_child(&mut running).await;
                    }
                    let result = start(&command, &environment).map(|started| {
                        tracing::info!(command = %command.join(" "), "service started");
                        child = Some(started);
                    });
                    wanted = result.is_ok().then_some((command, environment));
                    let _ = done.send(result);
                }
            },
            status = async {
                match child.as_mut() {
                    Some(running) => running.wait().await,
                    None => std::future::pending().await,
                }
            } => {
                child = None;
                tracing::warn!(?status, "service exited; restarting it");
                tokio::time::sleep(CRASH_RESTART_DELAY).await;
                if let Some((command, environment)) = &wanted {
                    match start(command, environment) {
                        Ok(started) => child = Some(started),
                        Err(error) => tracing::error!(%error, "cannot restart the service"),
                    }
                }
            }
        }
    }
}
