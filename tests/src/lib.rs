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

pub mod hostile_payloads;
pub mod https_endpoint;
pub mod netns;

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

/// The agent binary built with the `swap-hold` feature (tests only: it can
/// be held at a named swap step), in its own target directory so that the
/// normal binaries are never replaced by it. Built once per process.
pub fn swap_hold_agent_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target = binary_dir()
                .parent()
                .map(|target| target.join("swap-hold"))
                .unwrap_or_else(|| PathBuf::from("target/swap-hold"));
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut command = Command::new(cargo);
            if let Some(workspace) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
                command.current_dir(workspace);
            }
            let status = command
                .args([
                    "build",
                    "-p",
                    "flotte-agent",
                    "--bin",
                    "flotte-agent",
                    "--features",
                    "swap-hold",
                    "--target-dir",
                ])
                .arg(&target)
                .status();
            assert!(
                status.is_ok_and(|status| status.success()),
                "building the swap-hold agent failed"
            );
            target.join("debug").join("flotte-agent")
        })
        .clone()
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

/// `program`, run inside network namespace `namespace` (`ip netns exec`,
/// which execs it: the child's pid is the program's) or, without one, in
/// the test's own.
pub fn command_in_namespace(namespace: Option<&str>, program: &Path) -> Command {
    match namespace {
        Some(namespace) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", namespace]).arg(program);
            command
        }
        None => Command::new(program),
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
    /// The network namespace it runs in (see [`netns`]); none: the test's.
    namespace: Option<String>,
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
            namespace: None,
        }
    }

    /// Runs the server inside network namespace `namespace` (a lab host).
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    /// Extra arguments for every `run` (e.g. `--machine-certificate-ttl 3s`).
    pub fn with_run_args(mut self, args: &[&str]) -> Self {
        self.extra_run_args = args.iter().map(|arg| (*arg).to_owned()).collect();
        self
    }

    pub fn admin_profile(&self) -> PathBuf {
        self.data_dir.join("admin")
    }

    /// Appends TOML to the server's settings file (e.g. `[[webhook]]` tables).
    pub fn append_config(&self, toml: &str) {
        let path = self.data_dir.join("server.toml");
        let mut settings = std::fs::read_to_string(&path).expect("read server.toml");
        settings.push('\n');
        settings.push_str(toml);
        std::fs::write(&path, settings).expect("write server.toml");
    }

    /// The address of the server's `/metrics` listener, once it is serving.
    pub fn metrics_address(&self) -> Option<String> {
        wait_for_metrics_address(&self.data_dir)
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("ca").join("ca.pem")).expect("read CA")
    }

    /// Starts `flotte-server run`; on a restart it listens on the same address
    /// again so that agents find it.
    pub fn start(&mut self) {
        let address_file = self.data_dir.join("server.address");
        let _ = std::fs::remove_file(&address_file);
        // A previous run's file would name a listener that is gone.
        let _ = std::fs::remove_file(self.data_dir.join("metrics.address"));
        let mut command = command_in_namespace(self.namespace.as_deref(), &binary("flotte-server"));
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

    /// `flottectl operator create NAME --role ROLE` (as the admin) into
    /// `<root>/operator-NAME`; returns that profile directory.
    pub fn create_operator(&self, root: &Path, name: &str, role: &str) -> PathBuf {
        let profile = root.join(format!("operator-{name}"));
        let out = profile.to_str().expect("UTF-8 temp path");
        let output = self.ctl(&["operator", "create", name, "--role", role, "--out", out]);
        assert!(
            output.status.success(),
            "operator create {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        profile
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

/// Downloads `hostname`'s forensic bundle through the server at `address`,
/// as the operator of `profile`, into `out` once there is one (bundles are
/// uploaded by the agent after its quarantine): what `flottectl machines
/// forensics -o json` says of it. Panics with the last refusal after
/// `patience`.
pub fn wait_for_forensic_bundle(
    profile: &Path,
    address: &str,
    hostname: &str,
    out: &Path,
    patience: Duration,
) -> serde_json::Value {
    let out = out.to_str().expect("a UTF-8 path");
    let mut last = String::new();
    let mut downloaded = serde_json::Value::Null;
    let found = wait_until(patience, || {
        let output = flottectl(
            profile,
            address,
            &[
                "machines",
                "forensics",
                hostname,
                "--out",
                out,
                "-o",
                "json",
            ],
        );
        last = String::from_utf8_lossy(&output.stderr).into_owned();
        output.status.success() && {
            downloaded = serde_json::from_slice(&output.stdout).expect("flottectl printed JSON");
            true
        }
    });
    assert!(
        found,
        "no forensic bundle of {hostname} through {address}: {last}"
    );
    downloaded
}

/// Uploads `bundle` as the quarantine's forensic bundle with the identity of
/// the machine whose agent keeps `agent_data_dir`: what a compromised
/// machine could send on its own.
pub fn upload_forensics_as_machine(
    agent_data_dir: &Path,
    address: &str,
    quarantine_id: &str,
    bundle: &[u8],
) -> Result<u64, tonic::Status> {
    let identity = flotte_agent::identity::MachineIdentity::load(agent_data_dir)
        .unwrap()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (channel, _) = flotte_agent::image::fetch::dial(address, &identity).unwrap();
        let chunk = flotte_proto::v1::ForensicsChunk {
            quarantine_id: quarantine_id.to_owned(),
            data: bundle.to_vec(),
        };
        flotte_proto::v1::agent_session_client::AgentSessionClient::new(channel)
            .upload_forensics(tokio_stream::iter([chunk]))
            .await
            .map(|answer| answer.into_inner().size)
    })
}

fn read_address_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.ends_with('\n').then(|| text.trim().to_owned())
}

/// How long a `/metrics` listener may take to appear after its process
/// started: the server writes its serving address only once it has opened
/// its store and bound the listener, after its main address.
const METRICS_LISTENER_TIMEOUT: Duration = Duration::from_secs(20);

/// The address in a `metrics.address` file once its process has written it;
/// `None` if it did not within [`METRICS_LISTENER_TIMEOUT`].
fn wait_for_metrics_address(data_dir: &Path) -> Option<String> {
    let path = data_dir.join("metrics.address");
    let mut address = None;
    wait_until(METRICS_LISTENER_TIMEOUT, || {
        address = read_address_file(&path);
        address.is_some()
    });
    address
}

/// `GET http://address/path` with Flotte's own HTTP client (on a thread of
/// its own, so callable from inside a runtime too): status and body.
pub fn http_get(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    use flotte_proto::http::{request, HttpEndpoint, OutgoingRequest};
    let endpoint = HttpEndpoint::from_settings(&format!("http://{address}{path}"), None)
        .map_err(std::io::Error::other)?;
    let exchange = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime
            .block_on(request(
                &endpoint,
                OutgoingRequest::get(),
                Duration::from_secs(10),
                64 * 1024 * 1024,
            ))
            .map_err(std::io::Error::other)
    });
    let response = exchange
        .join()
        .map_err(|_| std::io::Error::other("the HTTP client thread panicked"))??;
    Ok((
        response.status,
        String::from_utf8_lossy(&response.body).into_owned(),
    ))
}

/// The status code of a raw `HTTP/1.x CODE REASON` response, for tests that
/// send hand-made (often deliberately wrong) requests.
pub fn parse_status_line(response: &str) -> Option<u16> {
    let line = response.lines().next()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// `GET /metrics` from `address`, parsed.
pub fn scrape(address: &str) -> prometheus_parse::Scrape {
    let (status, body) = http_get(address, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|line| Ok(line.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
pub fn sample_value(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .and_then(|sample| match sample.value {
            prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value) => Some(value),
            _ => None,
        })
}

/// A gRPC channel presenting the operator certificate of a profile directory.
pub fn channel_as(profile: &Path, address: &str) -> tonic::transport::Channel {
    let profile = flotte_common::profile::Profile::load(profile).expect("load the profile");
    let tls = flotte_proto::transport::client_config(
        &profile.ca_pem,
        Some((&profile.certificate_pem, &profile.key_pem)),
    )
    .expect("TLS client settings of the profile");
    flotte_proto::transport::channel(address, std::sync::Arc::new(tls)).expect("a channel")
}

/// A multi-threaded tokio runtime for the async parts of a test.
pub fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A real HTTP service for checks to watch: answers every request with 200
/// and `body` until stopped; can be restarted on the same port.
#[derive(Debug)]
pub struct TestHttpService {
    pub address: std::net::SocketAddr,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestHttpService {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind test service");
        let address = listener.local_addr().expect("test service address");
        let mut service = TestHttpService {
            address,
            stop: None,
            thread: None,
        };
        service.serve(listener);
        service
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_flag = std::sync::Arc::clone(&stop);
        self.thread = Some(std::thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buffer = [0u8; 2048];
                        let _ = stream.read(&mut buffer);
                        let _ = stream.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
        self.stop = Some(stop);
    }

    /// Stops answering and closes the port (connections are refused).
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Serves again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let listener = std::net::TcpListener::bind(self.address).expect("rebind test service");
        self.serve(listener);
    }
}

impl Drop for TestHttpService {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A webhook receiver: records the JSON body of every POST, answers 200.
#[derive(Debug)]
pub struct WebhookReceiver {
    pub url: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl WebhookReceiver {
    pub fn start() -> Self {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind webhook receiver");
        let url = format!(
            "http://{}/hook",
            listener.local_addr().expect("receiver address")
        );
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&received);
        // The thread ends with the test process.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream);
                let mut content_length = 0usize;
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|read| read > 0) {
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        content_length = value.trim().parse().unwrap_or(0);
                    }
                    line.clear();
                }
                let mut body = vec![0u8; content_length];
                if reader.read_exact(&mut body).is_ok() {
                    if let Ok(value) = serde_json::from_slice(&body) {
                        sink.lock().expect("receiver lock").push(value);
                    }
                }
                let mut stream = reader.into_inner();
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        WebhookReceiver { url, received }
    }

    pub fn received(&self) -> Vec<serde_json::Value> {
        self.received.lock().expect("receiver lock").clone()
    }
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
    /// Another agent binary (e.g. built with the `swap-hold` feature).
    pub binary: Option<PathBuf>,
    /// Extra environment for the next start.
    pub environment: Vec<(String, String)>,
    /// The network namespace it runs in (see [`netns`]); none: the test's.
    pub namespace: Option<String>,
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
            binary: None,
            environment: Vec::new(),
            namespace: None,
        }
    }

    /// Adds arguments to `flotte-agent run` (e.g. `--log-format json`).
    pub fn with_arguments(mut self, arguments: &[&str]) -> Self {
        self.args
            .extend(arguments.iter().map(|argument| (*argument).to_owned()));
        self
    }

    /// Runs the agent inside network namespace `namespace` (a lab host).
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    /// Adds server addresses (replicas) after the first one.
    pub fn with_more_servers(mut self, servers: &[&str]) -> Self {
        for server in servers {
            self.args.push("--server".into());
            self.args.push((*server).to_owned());
        }
        self
    }

    /// Adds settings only a config file can carry (checks, `[system]`,
    /// `metrics_listen`): written to `<data_dir>/agent.toml` and passed with
    /// `--config`; the flags still give data dir, server and token.
    pub fn with_config(mut self, toml: &str) -> Self {
        std::fs::create_dir_all(&self.data_dir).expect("create agent dir");
        let path = self.data_dir.join("agent.toml");
        std::fs::write(&path, toml).expect("write agent.toml");
        self.args.push("--config".into());
        self.args.push(path.display().to_string());
        self
    }

    /// The address of the agent's `/metrics` listener, once it is serving.
    pub fn metrics_address(&self) -> Option<String> {
        wait_for_metrics_address(&self.data_dir)
    }

    pub fn start(&mut self) {
        std::fs::create_dir_all(&self.data_dir).expect("create agent dir");
        // A previous run's file would name a listener that is gone.
        let _ = std::fs::remove_file(self.data_dir.join("metrics.address"));
        let program = self
            .binary
            .clone()
            .unwrap_or_else(|| binary("flotte-agent"));
        let mut command = command_in_namespace(self.namespace.as_deref(), &program);
        command
            .arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .envs(self.environment.iter().cloned())
            .env_remove("FLOTTE_JOIN_TOKEN");
        let log_path = self.data_dir.join("agent.log");
        self.process = Some(ManagedChild::spawn(command, log_path).expect("spawn flotte-agent"));
    }

    /// Starts the agent and waits until it is the server's only session.
    pub fn start_and_wait_for_session(&mut self, server: &Server) {
        self.start();
        let connected = wait_until(Duration::from_secs(30), || server.connected_count() == 1);
        assert!(connected, "no session:\n{}", self.log());
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
    for (name, _) in std::env::vars_os() {
        if name
            .to_str()
            .is_some_and(is_set_by_cargo_for_a_running_crate)
        {
            command.env_remove(name);
        }
    }
    command
}

/// Variables cargo sets for the program it runs (`cargo run`, `cargo test`)
/// to describe that program's package. A cargo started from that program
/// must not inherit them: cargo reruns build scripts that watch one of them
/// when its value changes (ring: `rerun-if-env-changed=CARGO_PKG_NAME`), so
/// the inner build would recompile ring and everything above it, and the
/// next outer build would do it all again.
fn is_set_by_cargo_for_a_running_crate(name: &str) -> bool {
    const EXACT: [&str; 8] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
    ];
    EXACT.contains(&name) || name.starts_with("CARGO_PKG_") || name.starts_with("CARGO_BIN_EXE_")
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

impl Server {
    /// A server over a data dir that already exists (e.g. restored from a
    /// backup), listening on `address` once started (empty: the settings').
    pub fn existing(data_dir: PathBuf, address: &str, run_args: &[&str]) -> Self {
        Server {
            data_dir,
            address: address.to_owned(),
            process: None,
            extra_run_args: run_args.iter().map(|arg| (*arg).to_owned()).collect(),
            namespace: None,
        }
    }
}
pub mod sample_fleet;
/// Spawns any program (e.g. a test's own `sshd`) as a [`ManagedChild`]
/// logging to `log_path`, killed when dropped.
pub fn spawn_managed(command: Command, log_path: PathBuf) -> std::io::Result<ManagedChild> {
    ManagedChild::spawn(command, log_path)
}

impl Server {
    /// Adds user `name` with a fresh ed25519 key (made under `root`) and
    /// grants it `login` on `role=web` with `extra` arguments (e.g. an
    /// expiry).
    pub fn grant_new_user_on_web(&self, root: &Path, name: &str, login: &str, extra: &[&str]) {
        let key = root.join(format!("{name}-key"));
        let keygen = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&key)
            .status()
            .expect("run ssh-keygen");
        assert!(keygen.success(), "ssh-keygen failed");
        let public = key.with_extension("pub");
        self.ctl_json(&[
            "user",
            "add",
            name,
            "--ssh-key",
            public.to_str().expect("UTF-8 path"),
        ]);
        let mut arguments = vec![
            "access",
            "grant",
            name,
            "--selector",
            "role=web",
            "--login",
            login,
        ];
        arguments.extend_from_slice(extra);
        self.ctl_json(&arguments);
    }

    /// Runs `flottectl` as the admin and returns its stdout; panics with
    /// stderr if it failed.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let output = self.ctl(args);
        assert!(
            output.status.success(),
            "flottectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// `sshd -t -f CONFIG` (sshd's config test); panics with sshd's complaint
/// naming `what` if it refuses the config.
pub fn assert_sshd_accepts(sshd: &Path, config: &Path, what: &str) {
    let output = Command::new(sshd)
        .arg("-t")
        .arg("-f")
        .arg(config)
        .output()
        .expect("run sshd -t");
    assert!(
        output.status.success(),
        "sshd -t refused {what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Set to `1` to skip these tests where sshd or root cannot be had; without
/// it a missing prerequisite fails the test (it must never pass silently).
pub const SKIP_SSHD_VARIABLE: &str = "FLOTTE_TEST_SKIP_SSHD";

/// Whether a missing prerequisite (`reason`) skips the test (only when
/// [`SKIP_SSHD_VARIABLE`] is `1`); panics naming it otherwise.
pub fn skip_for_missing_sshd(reason: &str, skip_asked: Option<&str>) -> bool {
    assert!(
        skip_asked == Some("1"),
        "this test needs a real sshd (and root for the access tests): {reason}. \
         Install what is missing, or set {SKIP_SSHD_VARIABLE}=1 to skip them explicitly"
    );
    println!("SKIPPED ({SKIP_SSHD_VARIABLE}=1): needs a real sshd: {reason}");
    true
}

/// Creates the Unix login if missing: not locked (`-p '*'`: no password,
/// which sshd without PAM would otherwise treat as a locked account).
pub fn ensure_login(login: &str) -> PathBuf {
    let exists = Command::new("id")
        .arg(login)
        .output()
        .is_ok_and(|output| output.status.success());
    if !exists {
        let status = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "-p", "*", login])
            .status()
            .expect("run useradd");
        assert!(status.success(), "useradd {login}");
    }
    PathBuf::from(format!("/home/{login}"))
}
