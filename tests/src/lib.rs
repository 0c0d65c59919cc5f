//! Test harness for end-to-end tests, the demo fleet and benchmarks: start the
//! real `flotte-server`, `flotte-agent` and `flottectl` binaries as child
//! processes on `127.0.0.1:0`, each with its own data dir under a temporary
//! directory, and wait for what they promise.
//!
//! Children are killed when their handle is dropped, so a failing test never
//! leaves a fleet behind. Nothing here fakes a component: if a helper waits
//! for something, it is the real process that must do it.

// A harness failure must stop the test (or demo) loudly with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A directory under the system temp dir, removed on drop unless
/// `FLOTTE_KEEP_TEST_DIRS` is set (to inspect logs after a failure).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("FLOTTE_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The directory holding the workspace's binaries: the one this executable
/// lives in (bins) or its parent (test executables live in `deps/`).
fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// Path of a workspace binary. Under cargo (`CARGO` set, as in `cargo test`)
/// the server and agent binaries are rebuilt once per process first: `cargo
/// test -p flotte-tests` alone would otherwise run stale binaries, and a test
/// of old code passing is worse than a slower start.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = binary_dir().join(name);
    if !path.exists() || std::env::var_os("CARGO").is_some() {
        BUILT.get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = build_binaries_command(&cargo).status();
            assert!(
                status.is_ok_and(|status| status.success()),
                "building the Flotte binaries failed"
            );
        });
    }
    path
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ManagedChild {
    child: Option<Child>,
    pub log_path: PathBuf,
}

impl ManagedChild {
    fn spawn(mut command: Command, log_path: PathBuf) -> std::io::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1");
        Ok(ManagedChild {
            child: Some(command.spawn()?),
            log_path,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap: a crash, as far as the process can tell.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).ok()?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit(timeout);
        if status.is_none() {
            self.kill();
        }
        status
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `flotte-server` data dir and, while running, its process.
#[derive(Debug)]
pub struct Server {
    pub data_dir: PathBuf,
    pub address: String,
    pub process: Option<ManagedChild>,
    extra_run_args: Vec<String>,
}

impl Server {
    /// `flotte-server init` into `<root>/<name>` (listening on port 0 unless
    /// `init_args` says otherwise).
    pub fn init(root: &Path, name: &str, init_args: &[&str]) -> Self {
        let data_dir = root.join(name);
        let mut command = Command::new(binary("flotte-server"));
        command.arg("init").arg("--data-dir").arg(&data_dir);
        if !init_args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command.args(init_args);
        let output = command.output().expect("run flotte-server init");
        assert!(
            output.status.success(),
            "flotte-server init failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Server {
            data_dir,
            address: String::new(),
            process: None,
            extra_run_args: Vec::new(),
        }
    }

    /// Extra arguments for every `run` (e.g. `--machine-certificate-ttl 3s`).
    pub fn with_run_args(mut self, args: &[&str]) -> Self {
        self.extra_run_args = args.iter().map(|arg| (*arg).to_owned()).collect();
        self
    }

    pub fn admin_profile(&self) -> PathBuf {
        self.data_dir.join("admin")
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("ca").join("ca.pem")).expect("read CA")
    }

    /// Starts `flotte-server run`; on a restart it listens on the same address
    /// again so that agents find it.
    pub fn start(&mut self) {
        let address_file = self.data_dir.join("server.address");
        let _ = std::fs::remove_file(&address_file);
        let mut command = Command::new(binary("flotte-server"));
        command.arg("run").arg("--data-dir").arg(&self.data_dir);
        if !self.address.is_empty() {
            command.args(["--listen", &self.address]);
        }
        command.args(&self.extra_run_args);
        let log_path = self.data_dir.join("server.log");
        let mut process = ManagedChild::spawn(command, log_path).expect("spawn flotte-server");
        let started = wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&address_file).is_ok_and(|text| text.ends_with('\n'))
        });
        assert!(
            started && process.is_running(),
            "flotte-server did not start:\n{}",
            process.log()
        );
        self.address = std::fs::read_to_string(&address_file)
            .expect("read server.address")
            .trim()
            .to_owned();
        self.process = Some(process);
    }

    /// SIGKILL the server.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default()
    }

    /// Runs `flottectl` with the admin profile against this server.
    pub fn ctl(&self, args: &[&str]) -> Output {
        flottectl(&self.admin_profile(), &self.address, args)
    }

    /// Runs `flottectl ... -o json` and parses stdout; panics with stderr on failure.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let output = self.ctl(&all);
        assert!(
            output.status.success(),
            "flottectl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("flottectl printed JSON")
    }

    /// Creates a join token and returns its secret text.
    pub fn token(&self, labels: &str, zone: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--labels", labels, "--zone", zone];
        args.extend(extra);
        let created = self.ctl_json(&args);
        created["token"].as_str().expect("token field").to_owned()
    }

    /// Machines as listed by `flottectl machines list -o json`.
    pub fn machines(&self) -> Vec<serde_json::Value> {
        self.ctl_json(&["machines", "list"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn connected_count(&self) -> usize {
        self.machines()
            .iter()
            .filter(|machine| machine["connected"] == serde_json::Value::Bool(true))
            .count()
    }
}

pub fn flottectl(profile: &Path, server: &str, args: &[&str]) -> Output {
    let mut command = Command::new(binary("flottectl"));
    command.arg("--profile").arg(profile);
    if !server.is_empty() {
        command.args(["--server", server]);
    }
    command
        .args(args)
        .env_remove("FLOTTE_PROFILE")
        .env_remove("FLOTTE_SERVER")
        .output()
        .expect("run flottectl")
}

/// Command-line arguments of a harness agent (fast reports and reconnects).
fn agent_arguments(server: &str, token: &str, hostname: &str) -> Vec<String> {
    let mut arguments = vec!["--server", server, "--hostname", hostname];
    if !token.is_empty() {
        arguments.extend(["--join", token]);
    }
    arguments.extend(["--report-interval", "1s", "--reconnect-max-backoff", "1s"]);
    arguments.into_iter().map(str::to_owned).collect()
}

/// A `flotte-agent` data dir and, while running, its process.
#[derive(Debug)]
pub struct Agent {
    pub data_dir: PathBuf,
    pub name: String,
    pub process: Option<ManagedChild>,
    args: Vec<String>,
}

impl Agent {
    /// Prepares (does not start) an agent named `name` under `root` that
    /// enrolls with `token` (none if empty: an agent already enrolled) at
    /// `server` and reports as hostname `name`.
    pub fn new(root: &Path, name: &str, server: &str, token: &str) -> Self {
        Agent {
            data_dir: root.join(name),
            name: name.to_owned(),
            process: None,
            args: agent_arguments(server, token, name),
        }
    }

    pub fn start(&mut self) {
        std::fs::create_dir_all(&self.data_dir).expect("create agent dir");
        let mut command = Command::new(binary("flotte-agent"));
        command
            .arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env_remove("FLOTTE_JOIN_TOKEN");
        let log_path = self.data_dir.join("agent.log");
        self.process = Some(ManagedChild::spawn(command, log_path).expect("spawn flotte-agent"));
    }

    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("agent.log")).unwrap_or_default()
    }

    pub fn is_enrolled(&self) -> bool {
        self.data_dir.join("identity").join("cert.pem").exists()
    }

    /// Waits for the process to exit by itself; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = self.process.as_mut()?.wait_exit(timeout);
        if status.is_some() {
            self.process = None;
        }
        status
    }
}

/// The directory the harness runs the workspace's binaries from: where the
/// running executable was built (`target/release` for `cargo run --release`).
pub fn binaries_directory() -> PathBuf {
    binary_dir()
}

/// The `cargo build` command that (re)builds `flotte-server`, `flottectl` and
/// `flotte-agent` into [`binaries_directory`], with the cargo profile that
/// directory belongs to. `cargo` is the cargo to run (`$CARGO` when started
/// by cargo, so that the same toolchain builds everything).
pub fn build_binaries_command(cargo: &std::ffi::OsStr) -> Command {
    let mut command = Command::new(cargo);
    // From the workspace root, so that it works wherever it is started from.
    if let Some(workspace) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        command.current_dir(workspace);
    }
    command.arg("build");
    let directory = binaries_directory();
    match directory.file_name().and_then(|name| name.to_str()) {
        // `debug` is where the default `dev` profile builds.
        Some("debug") | None => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(profile) => {
            command.args(["--profile", profile]);
        }
    }
    // The same selection as `cargo test --workspace`, so that features unify
    // alike and no dependency is compiled a second time.
    command.args(["--workspace", "--bins"]);
    command
}

/// [`ManagedChild::terminate`] signals the pid, which a process that has
/// already exited and been reaped (by `is_running`) may no longer own: only
/// a live (or not yet reaped) child is signalled.
fn terminate_unless_exited(process: &mut ManagedChild, timeout: Duration) -> Option<ExitStatus> {
    if process.is_running() {
        process.terminate(timeout)
    } else {
        process.wait_exit(Duration::ZERO)
    }
}

impl Server {
    /// Whether the server process is alive (false if never started or gone).
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(ManagedChild::is_running)
    }

    /// SIGTERM and wait up to `timeout` for a clean exit (SIGKILL after it);
    /// the exit status if it exited by itself, `None` if it was not running
    /// or had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = terminate_unless_exited(self.process.as_mut()?, timeout);
        self.process = None;
        status
    }
}

impl Agent {
    /// Whether the agent process is alive (false if never started or gone).
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(ManagedChild::is_running)
    }

    /// SIGTERM and wait up to `timeout` for a clean exit (SIGKILL after it);
    /// the exit status if it exited by itself, `None` if it was not running
    /// or had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = terminate_unless_exited(self.process.as_mut()?, timeout);
        self.process = None;
        status
    }
}
