//! The service an image provides: either supervised by the agent (command
//! from the agent config or the image manifest, run from `images/current`,
//! output to a size-bounded log, restarted if it dies) or restarted through a
//! configured command (e.g. `systemctl restart app`, whose unit runs from
//! `current/`).
//!
//! A supervised service gets only the environment its manifest declares
//! (plus a default `PATH`): never the agent's own, which may hold the join
//! token. It runs as the `user`/`group` of the agent's `[service]` settings,
//! else of the manifest — the setting wins because the machine decides who
//! runs on it. Named by neither, it never runs as root: an agent running as
//! root runs it as the dedicated account `flotte-svc` (created at install),
//! else as `nobody` (with a warning), and refuses to start it when neither
//! exists; an agent that is not root can only run it as itself. Root only
//! when named. Supplementary groups are dropped when switching user.

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
/// `PATH` of a service whose manifest does not declare one.
pub const DEFAULT_SERVICE_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The agent's own variable a child must never see.
pub const JOIN_TOKEN_VARIABLE: &str = "FLOTTE_JOIN_TOKEN";

/// The account a service runs as when nobody named one (INSTALL creates it).
pub const DEFAULT_SERVICE_USER: &str = "flotte-svc";
/// The last resort when that account does not exist: never root.
pub const FALLBACK_SERVICE_USER: &str = "nobody";

/// Who a supervised service runs as, from the agent's settings (each
/// overrides the manifest's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunAs {
    pub user: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceMode {
    /// The agent runs the command (config override, else the manifest's).
    Supervised {
        command_override: Option<Vec<String>>,
        log_path: PathBuf,
        log_max_bytes: u64,
        run_as: RunAs,
    },
    /// The agent runs this command to restart a service managed elsewhere.
    RestartCommand(Vec<String>),
    /// Images carry files only.
    Unmanaged,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot start the service {command:?}: {source}{}", if source.kind() == std::io::ErrorKind::PermissionDenied && *as_another_user {
        " (it runs as an unprivileged user, who must be able to pass through every directory down to images/current: make the agent's data dir 0711 and its parents at least 0711)"
    } else {
        ""
    })]
    Start {
        command: String,
        source: std::io::Error,
        /// Whether it was started as another user than the agent's.
        as_another_user: bool,
    },
    #[error("restart command {command:?} failed: {reason}")]
    RestartCommand { command: String, reason: String },
    #[error("the service supervisor is gone")]
    SupervisorGone,
    #[error("cannot run the service as {what} {name:?}: {reason}")]
    RunAs {
        what: &'static str,
        name: String,
        reason: String,
    },
    #[error("refusing to run the service as root by default: neither [service] user nor the manifest names a user, and neither the account {DEFAULT_SERVICE_USER} (see INSTALL.md) nor {FALLBACK_SERVICE_USER} exists on this machine; create {DEFAULT_SERVICE_USER} or set [service] user")]
    NoServiceUser,
}

/// The user a service runs as: `named` (the settings', else the
/// manifest's) if any; else, for an agent running as root, the first of
/// [`DEFAULT_SERVICE_USER`] and [`FALLBACK_SERVICE_USER`] that `exists`
/// (never root by default); else (an agent that is not root cannot switch)
/// none, i.e. the agent's own user.
pub fn service_user(
    named: Option<String>,
    agent_is_root: bool,
    exists: &dyn Fn(&str) -> bool,
) -> Result<Option<String>, ServiceError> {
    if named.is_some() || !agent_is_root {
        return Ok(named);
    }
    [DEFAULT_SERVICE_USER, FALLBACK_SERVICE_USER]
        .into_iter()
        .find(|candidate| exists(candidate))
        .map(|chosen| Some(chosen.to_owned()))
        .ok_or(ServiceError::NoServiceUser)
}

/// Whether `name` is an account of this machine.
fn account_exists(name: &str) -> bool {
    nix::unistd::User::from_name(name).is_ok_and(|user| user.is_some())
}

/// What starting the service takes: the command line, the declared
/// environment, and who it runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLaunch {
    pub command: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub user: Option<String>,
    pub group: Option<String>,
}

enum Request {
    Run {
        launch: ServiceLaunch,
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
                command_override,
                run_as,
                ..
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
                let declared = |pick: fn(&ServiceSpec) -> &Option<String>| {
                    manifest_service.and_then(|spec| pick(spec).clone())
                };
                let named = run_as.user.clone().or_else(|| declared(|spec| &spec.user));
                let user = service_user(
                    named.clone(),
                    nix::unistd::geteuid().is_root(),
                    &account_exists,
                )?;
                if named.is_none() && user.as_deref() == Some(FALLBACK_SERVICE_USER) {
                    tracing::warn!(
                        "no service user named and no {DEFAULT_SERVICE_USER} account: running the service as {FALLBACK_SERVICE_USER}; create {DEFAULT_SERVICE_USER} (INSTALL.md) or set [service] user"
                    );
                }
                let launch = ServiceLaunch {
                    command,
                    environment,
                    user,
                    group: run_as
                        .group
                        .clone()
                        .or_else(|| declared(|spec| &spec.group)),
                };
                let (done, answer) = oneshot::channel();
                self.send(Request::Run { launch, done }).await?;
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
        .env_remove(JOIN_TOKEN_VARIABLE)
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

/// The service's whole environment: a default `PATH` unless declared, and
/// exactly what the manifest declares.
pub fn service_environment(declared: &[(String, String)]) -> Vec<(String, String)> {
    let mut environment = Vec::with_capacity(declared.len() + 1);
    if !declared.iter().any(|(name, _)| name == "PATH") {
        environment.push(("PATH".to_owned(), DEFAULT_SERVICE_PATH.to_owned()));
    }
    environment.extend(declared.iter().cloned());
    environment
}

/// The uid and gid to run as: the user's, with its primary group unless a
/// group is named.
fn resolve_run_as(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<(Option<u32>, Option<u32>), ServiceError> {
    let lookup_error = |what: &'static str, name: &str, reason: String| ServiceError::RunAs {
        what,
        name: name.to_owned(),
        reason,
    };
    let account = match user {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .map_err(|error| lookup_error("user", name, error.to_string()))?
                .ok_or_else(|| lookup_error("user", name, "no such user".into()))?,
        ),
        None => None,
    };
    let gid = match group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .map_err(|error| lookup_error("group", name, error.to_string()))?
                .ok_or_else(|| lookup_error("group", name, "no such group".into()))?
                .gid
                .as_raw(),
        ),
        None => account.as_ref().map(|account| account.gid.as_raw()),
    };
    Ok((account.map(|account| account.uid.as_raw()), gid))
}

fn spawn(run_directory: &std::path::Path, launch: &ServiceLaunch) -> Result<Child, ServiceError> {
    let display = launch.command.join(" ");
    let Some((program, arguments)) = launch.command.split_first() else {
        return Err(ServiceError::Start {
            command: display,
            source: std::io::Error::other("empty command"),
            as_another_user: false,
        });
    };
    let (uid, gid) = resolve_run_as(launch.user.as_deref(), launch.group.as_deref())?;
    let mut process = Command::new(program_path(run_directory, program));
    process
        .args(arguments)
        .env_clear()
        .envs(service_environment(&launch.environment))
        .current_dir(run_directory)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // Setting the uid as root also drops every supplementary group (std
    // calls setgroups(0) first), so no group of the agent's leaks.
    if let Some(gid) = gid {
        process.gid(gid);
    }
    if let Some(uid) = uid {
        process.uid(uid);
    }
    process.spawn().map_err(|source| ServiceError::Start {
        command: display,
        source,
        as_another_user: uid.is_some(),
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
    let mut wanted: Option<ServiceLaunch> = None;
    let start = |launch: &ServiceLaunch| -> Result<Child, ServiceError> {
        let mut started = spawn(&run_directory, launch)?;
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
                Some(Request::Run { launch, done }) => {
                    if let Some(mut running) = child.take() {
                        stop_child(&mut running).await;
                    }
                    let result = start(&launch).map(|started| {
                        tracing::info!(command = %launch.command.join(" "), user = ?launch.user, "service started");
                        child = Some(started);
                    });
                    wanted = result.is_ok().then_some(launch);
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
                if let Some(launch) = &wanted {
                    match start(launch) {
                        Ok(started) => child = Some(started),
                        Err(error) => tracing::error!(%error, "cannot restart the service"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn launch(command: &[&str], user: Option<&str>) -> ServiceLaunch {
        ServiceLaunch {
            command: command.iter().map(|word| (*word).to_owned()).collect(),
            environment: vec![("APP_MODE".to_owned(), "blue".to_owned())],
            user: user.map(str::to_owned),
            group: None,
        }
    }

    async fn output_of(launch: &ServiceLaunch) -> String {
        let child = spawn(&std::env::temp_dir(), launch).unwrap();
        let output = child.wait_with_output().await.unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    #[tokio::test]
    async fn a_service_sees_only_its_declared_environment() {
        // The agent's own environment (HOME, a join token in
        // FLOTTE_JOIN_TOKEN…) is not passed on: only PATH and what is declared.
        let environment = output_of(&launch(&["/usr/bin/env"], None)).await;
        let mut names: Vec<&str> = environment
            .lines()
            .filter_map(|line| line.split('=').next())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["APP_MODE", "PATH"], "{environment}");
        assert!(environment.contains(&format!("PATH={DEFAULT_SERVICE_PATH}")));
        let declared_path = service_environment(&[("PATH".into(), "/opt/app/bin".into())]);
        assert_eq!(
            declared_path,
            [("PATH".to_owned(), "/opt/app/bin".to_owned())]
        );
    }

    #[test]
    fn a_service_named_by_nobody_never_defaults_to_root() {
        let only = |accounts: &'static [&'static str]| move |name: &str| accounts.contains(&name);
        // (named, agent is root, accounts of the machine, chosen)
        type Case = (
            Option<&'static str>,
            bool,
            &'static [&'static str],
            Option<&'static str>,
        );
        let cases: [Case; 6] = [
            (Some("app"), true, &["flotte-svc"], Some("app")),
            (Some("root"), true, &["flotte-svc"], Some("root")),
            (None, true, &["flotte-svc", "nobody"], Some("flotte-svc")),
            (None, true, &["nobody"], Some("nobody")),
            (None, false, &["flotte-svc"], None),
            (Some("app"), false, &[], Some("app")),
        ];
        for (named, agent_is_root, accounts, expected) in cases {
            let chosen =
                service_user(named.map(str::to_owned), agent_is_root, &only(accounts)).unwrap();
            assert_eq!(
                chosen.as_deref(),
                expected,
                "{named:?} {agent_is_root} {accounts:?}"
            );
        }
        let error = service_user(None, true, &only(&["root"])).unwrap_err();
        assert!(matches!(error, ServiceError::NoServiceUser));
        let message = error.to_string();
        assert!(
            message.contains("refusing to run the service as root")
                && message.contains("create flotte-svc or set [service] user"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_service_named_by_nobody_runs_unprivileged_in_a_real_process() {
        let default =
            service_user(None, nix::unistd::geteuid().is_root(), &account_exists).unwrap();
        let identity = output_of(&launch(&["/usr/bin/id", "-u"], default.as_deref())).await;
        let uid: u32 = identity.trim().parse().unwrap();
        match default {
            Some(name) => {
                // The agent is root: the service is not.
                let account = nix::unistd::User::from_name(&name).unwrap().unwrap();
                assert!(name == DEFAULT_SERVICE_USER || name == FALLBACK_SERVICE_USER);
                assert_eq!(uid, account.uid.as_raw());
                assert_ne!(uid, 0);
            }
            // Not root: the agent's own user, which is not root either.
            None => assert_eq!(uid, nix::unistd::geteuid().as_raw()),
        }
    }

    #[tokio::test]
    async fn a_service_runs_as_its_user_without_the_agents_groups() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let as_nobody = launch(&["/usr/bin/id"], Some("nobody"));
        if nix::unistd::getuid().is_root() {
            let identity = output_of(&as_nobody).await;
            let expected = format!("uid={}(nobody)", nobody.uid);
            assert!(identity.starts_with(&expected), "{identity}");
            // No supplementary group of root's (gid 0) survives the switch.
            assert!(!identity.contains("(root)"), "{identity}");
        } else {
            // Without root the switch is refused, never silently skipped.
            let error = spawn(&std::env::temp_dir(), &as_nobody).unwrap_err();
            assert!(matches!(error, ServiceError::Start { .. }), "{error}");
        }
        let error = spawn(
            &std::env::temp_dir(),
            &launch(&["/usr/bin/id"], Some("no-such-user-here")),
        )
        .unwrap_err();
        assert!(error.to_string().contains("no such user"), "{error}");
    }
}
