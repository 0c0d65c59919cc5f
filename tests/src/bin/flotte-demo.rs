//! `flotte-demo`: a whole Flotte fleet on this machine in one command. It
//! builds the release binaries (when started by cargo), initialises a server
//! on 127.0.0.1, signs and pushes the sample images (v1, v2, and a broken
//! v3), enrolls six agents with join tokens across three zones (qa-1 for
//! qualification, web-1…web-5 in production), waits for their mutual-TLS
//! sessions, puts v1 everywhere, then runs a staged rollout of v2
//! (qualification → canary → waves, progress shown live) and one of the
//! broken v3, which halts at the canary and rolls back by itself. It then
//! prints the `flottectl` command lines to explore the fleet from another
//! terminal and reprints the fleet every 10 s until Ctrl-C or SIGTERM, when
//! it stops every process cleanly.
//!
//! It runs the real binaries through the test harness (`flotte_tests`), so
//! what the demo shows is what the product does. The demo is a list of steps
//! (`STEPS`) run in order; later demos (a staged rollout) add steps there.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;
use flotte_tests::sample_fleet::{
    fleet_runs, push_sample_image, set_image_on, start_sample_machine, trust_new_release_key,
    Behaviour,
};
use flotte_tests::{
    binaries_directory, binary, build_binaries_command, flottectl, wait_until, Agent, Server,
    TempDir,
};
use tokio::signal::unix::{signal, SignalKind};

/// Prints a line on standard output, ignoring failure: the output may go to
/// a pipe whose reader died with the same Ctrl-C (`| tee`), and stopping the
/// fleet cleanly matters more than reporting it (`println!` would panic).
macro_rules! say {
    ($($argument:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($argument)*);
    }};
}

/// How long the six agents may take to enroll and open their sessions. They
/// need well under a second on a laptop; the margin covers a loaded machine.
const SESSIONS_TIMEOUT: Duration = Duration::from_secs(60);
const FLEET_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Agents and server stop within a few seconds of SIGTERM (the server gives
/// connections 5 s); past this they are killed and the demo says so.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How much of each log is shown when something goes wrong.
const LOG_TAIL_LINES: usize = 30;
const BINARIES: [&str; 3] = ["flotte-server", "flotte-agent", "flottectl"];

/// One demo machine: the hostname its agent reports and what its join token
/// gives it.
struct DemoMachine {
    hostname: &'static str,
    zone: &'static str,
    labels: &'static str,
}

const DEMO_MACHINES: [DemoMachine; 6] = [
    DemoMachine {
        hostname: "qa-1",
        zone: "dc1",
        labels: "env=qa,role=web",
    },
    DemoMachine {
        hostname: "web-1",
        zone: "dc1",
        labels: "env=prod,role=web",
    },
    DemoMachine {
        hostname: "web-2",
        zone: "dc2",
        labels: "env=prod,role=web",
    },
    DemoMachine {
        hostname: "web-3",
        zone: "dc3",
        labels: "env=prod,role=web",
    },
    DemoMachine {
        hostname: "web-4",
        zone: "dc2",
        labels: "env=prod,role=web",
    },
    DemoMachine {
        hostname: "web-5",
        zone: "dc3",
        labels: "env=prod,role=web",
    },
];

/// The staged rollout of v2, as an operator would write it.
const ROLLOUT_PLAN: &str = r#"[[stage]]
name = "qualification"
selector = "env=qa"
batch = "100%"
bake = "2s"

[[stage]]
name = "canary"
selector = "env=prod"
batch = 1
bake = "3s"

[[stage]]
name = "waves"
selector = "env=prod"
batch = "50%"
max_unavailable_per_zone = 1
bake = "1s"

[policy]
max_failures = 1
machine_deadline = "60s"
on_failure = "rollback"
"#;

/// The plan of the broken v3: straight to a canary that bakes long enough
/// for the release to show its fault.
const BROKEN_ROLLOUT_PLAN: &str = r#"[[stage]]
name = "canary"
selector = "env=prod"
batch = 1
bake = "8s"

[[stage]]
name = "waves"
selector = "env=prod"
batch = "50%"
max_unavailable_per_zone = 1

[policy]
max_failures = 1
machine_deadline = "60s"
on_failure = "rollback"
"#;

#[derive(Debug, Parser)]
#[command(
    name = "flotte-demo",
    about = "Run a Flotte server and six agents on 127.0.0.1, roll out images, until Ctrl-C"
)]
struct Cli {
    /// Keep the fleet's data dirs and logs in DIR (new or empty) after the
    /// demo; without it a temporary directory is used and removed at exit.
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug)]
enum DemoError {
    /// SIGINT or SIGTERM arrived: not a failure, the demo just stops.
    Stopped,
    Failed(String),
}

impl From<std::io::Error> for DemoError {
    fn from(error: std::io::Error) -> Self {
        DemoError::Failed(error.to_string())
    }
}

/// Set once SIGINT or SIGTERM has arrived; every wait in the demo polls it.
#[derive(Debug, Clone, Default)]
struct StopRequest(Arc<AtomicBool>);

impl StopRequest {
    fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// `Err(Stopped)` once a stop was requested, to end a step early.
    fn check(&self) -> Result<(), DemoError> {
        if self.is_requested() {
            Err(DemoError::Stopped)
        } else {
            Ok(())
        }
    }
}

/// Installs the SIGINT and SIGTERM handlers now, before any child process is
/// started, so that no signal can end the demo without it stopping its
/// children. (`flotte_proto::signals::wait_for_termination` registers only
/// when first polled, which would leave that window open.) The handlers run
/// on `runtime`'s worker thread while the demo's own thread works and waits.
fn listen_for_stop_signals(
    runtime: &tokio::runtime::Runtime,
    stop: StopRequest,
) -> std::io::Result<()> {
    let _runtime_context = runtime.enter();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    runtime.spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        eprintln!("\nflotte-demo: {name} received, stopping the fleet");
        stop.request();
    });
    Ok(())
}

/// Quotes `text` for a POSIX shell when it needs it, so that printed command
/// lines can be pasted as they are.
fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=,@+%".contains(&b));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn command_line(program: &OsStr, args: &[&OsStr]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .map(|part| shell_quote(&part.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe_command(command: &Command) -> String {
    let args: Vec<&OsStr> = command.get_args().collect();
    command_line(command.get_program(), &args)
}

fn log_tail(label: &str, log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    format!(
        "--- last lines of the {label} log ---\n{}\n",
        lines[start..].join("\n")
    )
}

fn describe_exit(status: Option<ExitStatus>) -> String {
    match status {
        Some(status) if status.success() => "stopped cleanly".to_owned(),
        Some(status) => format!("stopped with {status}"),
        None => format!(
            "did not stop within {}s and was killed",
            STOP_TIMEOUT.as_secs()
        ),
    }
}

/// Where the fleet's data dirs and logs live: kept if the user named it.
enum DataRoot {
    Kept(PathBuf),
    Temporary(TempDir),
}

impl DataRoot {
    fn prepare(requested: Option<PathBuf>) -> Result<Self, DemoError> {
        let Some(directory) = requested else {
            return Ok(DataRoot::Temporary(TempDir::new("flotte-demo")?));
        };
        let in_use = std::fs::read_dir(&directory)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false);
        if in_use {
            return Err(DemoError::Failed(format!(
                "{} is not empty (an earlier demo?): remove it or pass another --dir",
                directory.display()
            )));
        }
        std::fs::create_dir_all(&directory)?;
        // Absolute, so that printed commands work from any directory.
        Ok(DataRoot::Kept(std::fs::canonicalize(&directory)?))
    }

    fn path(&self) -> &Path {
        match self {
            DataRoot::Kept(path) => path,
            DataRoot::Temporary(temporary) => temporary.path(),
        }
    }
}

/// The fleet as it is built up, step by step.
struct Demo {
    root: PathBuf,
    stop: StopRequest,
    server: Option<Server>,
    agents: Vec<Agent>,
    /// The release key pair signing the sample images.
    keys: PathBuf,
}

type Step = fn(&mut Demo) -> Result<(), DemoError>;

/// The demo, in order. Each step prints what it does; a failed or
/// interrupted step ends the run (the fleet is then stopped).
const STEPS: [(&str, Step); 10] = [
    ("build the binaries", Demo::build_binaries),
    ("initialise the server", Demo::init_server),
    ("start the server", Demo::start_server),
    (
        "make a release key; sign and push the sample images",
        Demo::push_images,
    ),
    (
        "create join tokens and start the agents",
        Demo::start_agents,
    ),
    ("wait for the agents' sessions", Demo::wait_for_sessions),
    ("put app@1.0.0 on every machine", Demo::install_first_image),
    (
        "roll out app@2.0.0: qualification → canary → waves",
        Demo::roll_out_v2,
    ),
    (
        "roll out the broken app@3.0.0: it halts at the canary and rolls back",
        Demo::roll_out_broken_v3,
    ),
    ("show the fleet", Demo::show_fleet),
];

impl Demo {
    fn server(&self) -> Result<&Server, DemoError> {
        self.server
            .as_ref()
            .ok_or_else(|| DemoError::Failed("the server was not initialised".to_owned()))
    }

    fn server_mut(&mut self) -> Result<&mut Server, DemoError> {
        self.server
            .as_mut()
            .ok_or_else(|| DemoError::Failed("the server was not initialised".to_owned()))
    }

    fn run_steps(&mut self) -> Result<(), DemoError> {
        for (index, (title, step)) in STEPS.iter().enumerate() {
            self.stop.check()?;
            say!("\n==> [{}/{}] {title}", index + 1, STEPS.len());
            step(self)?;
        }
        Ok(())
    }

    /// Makes sure the binaries exist and are fresh. Started by cargo
    /// (`$CARGO` set), the harness rebuilds them before their first use with
    /// the command shown here; otherwise it uses them as they are (and builds
    /// them only if missing).
    fn build_binaries(&mut self) -> Result<(), DemoError> {
        match std::env::var_os("CARGO") {
            Some(cargo) => say!("$ {}", describe_command(&build_binaries_command(&cargo))),
            None => say!(
                "not started by cargo: using the binaries in {} as they are\n\
                 (`cargo run --release -p flotte-tests --bin flotte-demo` rebuilds them first)",
                binaries_directory().display()
            ),
        }
        let missing: Vec<&str> = BINARIES
            .into_iter()
            .filter(|name| !binary(name).exists())
            .collect();
        if !missing.is_empty() {
            return Err(DemoError::Failed(format!(
                "missing in {}: {}",
                binaries_directory().display(),
                missing.join(", ")
            )));
        }
        say!("binaries: {}", binaries_directory().display());
        Ok(())
    }

    fn init_server(&mut self) -> Result<(), DemoError> {
        let server = Server::init(&self.root, "server", &[]);
        say!("data dir:      {}", server.data_dir.display());
        say!("admin profile: {}", server.admin_profile().display());
        self.server = Some(server);
        Ok(())
    }

    fn start_server(&mut self) -> Result<(), DemoError> {
        let server = self.server_mut()?;
        server.start();
        say!("listening on {}", server.address);
        say!(
            "log:          {}",
            server.data_dir.join("server.log").display()
        );
        Ok(())
    }

    /// The flottectl command line for `args`, with the admin profile and the
    /// server address, ready to paste into another terminal.
    fn flottectl_command_line(&self, args: &[&str]) -> Result<String, DemoError> {
        let server = self.server()?;
        let profile = server.admin_profile();
        let mut all: Vec<&OsStr> = vec![
            OsStr::new("--profile"),
            profile.as_os_str(),
            OsStr::new("--server"),
            OsStr::new(&server.address),
        ];
        all.extend(args.iter().map(OsStr::new));
        Ok(command_line(
            binaries_directory().join("flottectl").as_os_str(),
            &all,
        ))
    }

    fn start_agents(&mut self) -> Result<(), DemoError> {
        for machine in &DEMO_MACHINES {
            self.stop.check()?;
            let token_arguments = [
                "token",
                "create",
                "--labels",
                machine.labels,
                "--zone",
                machine.zone,
                "--ttl",
                "1h",
            ];
            say!("$ {}", self.flottectl_command_line(&token_arguments)?);
            let server = self.server()?;
            // Each agent serves the sample image on its own port and checks it.
            let agent = start_sample_machine(
                server,
                &self.root,
                &self.keys,
                machine.hostname,
                machine.zone,
                machine.labels,
            )
            .agent;
            say!(
                "started agent {} (zone {}, labels {}); data dir {}",
                machine.hostname,
                machine.zone,
                machine.labels,
                agent.data_dir.display()
            );
            self.agents.push(agent);
        }
        Ok(())
    }

    fn push_images(&mut self) -> Result<(), DemoError> {
        let server = self.server()?;
        self.keys = trust_new_release_key(server, &self.root);
        say!(
            "release key {} (trusted by the server and the agents)",
            self.keys.display()
        );
        for (version, behaviour, note) in [
            ("1.0.0", Behaviour::Healthy, "healthy"),
            ("2.0.0", Behaviour::Healthy, "healthy"),
            (
                "3.0.0",
                Behaviour::BreaksAfter(3.0),
                "broken: fails its health check 3 s after starting",
            ),
        ] {
            let server = self.server()?;
            let file = push_sample_image(server, &self.root, &self.keys, version, behaviour);
            say!("pushed app@{version} ({note}) from {}", file.display());
        }
        Ok(())
    }

    fn install_first_image(&mut self) -> Result<(), DemoError> {
        say!(
            "$ {}",
            self.flottectl_command_line(&["machines", "set-image", "ID", "app@1.0.0"])?
        );
        let server = self.server()?;
        let hostnames: Vec<&str> = DEMO_MACHINES
            .iter()
            .map(|machine| machine.hostname)
            .collect();
        set_image_on(server, &hostnames, "1.0.0").map_err(DemoError::Failed)?;
        let stop = self.stop.clone();
        let ready = wait_until(Duration::from_secs(120), || {
            stop.is_requested() || fleet_runs(server, "1.0.0")
        });
        self.stop.check()?;
        if !ready {
            return Err(DemoError::Failed(format!(
                "the fleet did not reach app@1.0.0\n{}",
                self.all_logs()
            )));
        }
        self.print_fleet()
    }

    /// Runs flottectl with its output on this terminal (live progress). A
    /// stop request (SIGTERM reaches only the demo, unlike Ctrl-C) ends it.
    fn flottectl_live(&self, args: &[&str]) -> Result<ExitStatus, DemoError> {
        let server = self.server()?;
        say!("$ {}", self.flottectl_command_line(args)?);
        let mut child = Command::new(binary("flottectl"))
            .arg("--profile")
            .arg(server.admin_profile())
            .args(["--server", &server.address])
            .args(args)
            .spawn()?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if self.stop.is_requested() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DemoError::Stopped);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes `plan`, shows its dry run, creates the rollout and follows it;
    /// returns the rollout's final state.
    fn roll_out(&mut self, image: &str, plan_name: &str, plan: &str) -> Result<String, DemoError> {
        let plan_path = self.root.join(plan_name);
        std::fs::write(&plan_path, plan)?;
        say!("{}:\n{plan}", plan_path.display());
        let plan_arg = plan_path.to_string_lossy().into_owned();
        let create = [
            "rollout",
            "create",
            "--image",
            image,
            "--plan",
            plan_arg.as_str(),
        ];
        let mut dry_run = create.to_vec();
        dry_run.push("--dry-run");
        self.flottectl_live(&dry_run)?;
        let server = self.server()?;
        say!("$ {}", self.flottectl_command_line(&create)?);
        let mut json = create.to_vec();
        json.extend(["-o", "json"]);
        let output = flottectl(&server.admin_profile(), &server.address, &json);
        if !output.status.success() {
            return Err(DemoError::Failed(format!(
                "rollout create: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let created: serde_json::Value =
            serde_json::from_slice(&output.stdout).map_err(|error| {
                DemoError::Failed(format!("rollout create printed no JSON: {error}"))
            })?;
        let id = created["id"].as_str().unwrap_or_default().to_owned();
        say!("rollout {id} created");
        self.stop.check()?;
        self.flottectl_live(&["rollout", "watch", &id])?;
        self.stop.check()?;
        let shown = flottectl(
            &server.admin_profile(),
            &server.address,
            &["rollout", "show", &id, "-o", "json"],
        );
        let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap_or_default();
        Ok(shown["state"].as_str().unwrap_or("unknown").to_owned())
    }

    fn roll_out_v2(&mut self) -> Result<(), DemoError> {
        let state = self.roll_out("app@2.0.0", "rollout-v2.toml", ROLLOUT_PLAN)?;
        if state != "succeeded" {
            return Err(DemoError::Failed(format!(
                "the rollout of app@2.0.0 ended {state}\n{}",
                self.all_logs()
            )));
        }
        say!("every machine runs app@2.0.0");
        Ok(())
    }

    fn roll_out_broken_v3(&mut self) -> Result<(), DemoError> {
        let state = self.roll_out("app@3.0.0", "rollout-v3.toml", BROKEN_ROLLOUT_PLAN)?;
        if state != "rolled_back" {
            return Err(DemoError::Failed(format!(
                "the broken rollout of app@3.0.0 ended {state}, not rolled_back\n{}",
                self.all_logs()
            )));
        }
        say!("app@3.0.0 halted at the canary and was rolled back; the fleet stays on app@2.0.0");
        let listed = self.server()?.ctl(&["rollout", "list"]);
        say!("{}", String::from_utf8_lossy(&listed.stdout).trim_end());
        Ok(())
    }

    /// The logs of every process, for a failure message.
    fn all_logs(&self) -> String {
        let mut logs = String::new();
        if let Some(server) = &self.server {
            logs.push_str(&log_tail("server", &server.log()));
        }
        for agent in &self.agents {
            logs.push_str(&log_tail(&format!("agent {}", agent.name), &agent.log()));
        }
        logs
    }

    /// The name of a process of the fleet that is no longer running, if any.
    fn exited_process(&mut self) -> Option<String> {
        if let Some(server) = &mut self.server {
            if !server.is_running() {
                return Some("the server".to_owned());
            }
        }
        self.agents
            .iter_mut()
            .find_map(|agent| (!agent.is_running()).then(|| format!("agent {}", agent.name)))
    }

    fn wait_for_sessions(&mut self) -> Result<(), DemoError> {
        let expected = self.agents.len();
        let mut connected = 0;
        let mut exited = None;
        let stop = self.stop.clone();
        wait_until(SESSIONS_TIMEOUT, || {
            exited = self.exited_process();
            if exited.is_some() || stop.is_requested() {
                return true;
            }
            connected = self.server().map_or(0, Server::connected_count);
            connected == expected
        });
        self.stop.check()?;
        if let Some(process) = exited {
            return Err(DemoError::Failed(format!(
                "{process} exited before all agents were connected\n{}",
                self.all_logs()
            )));
        }
        if connected != expected {
            return Err(DemoError::Failed(format!(
                "only {connected} of {expected} agents connected within {}s\n{}",
                SESSIONS_TIMEOUT.as_secs(),
                self.all_logs()
            )));
        }
        say!("{expected} agents connected");
        Ok(())
    }

    /// Runs `flottectl machines list` and prints its output.
    fn print_fleet(&self) -> Result<(), DemoError> {
        let output = self.server()?.ctl(&["machines", "list"]);
        say!("{}", String::from_utf8_lossy(&output.stdout).trim_end());
        if !output.status.success() {
            return Err(DemoError::Failed(format!(
                "flottectl machines list failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    fn show_fleet(&mut self) -> Result<(), DemoError> {
        say!("$ {}", self.flottectl_command_line(&["machines", "list"])?);
        self.print_fleet()?;
        say!("\nThe fleet is running. In another terminal, try:");
        for args in [
            &["machines", "list"][..],
            &["machines", "show", DEMO_MACHINES[0].hostname],
            &["machines", "list", "--selector", "role=web", "-o", "json"],
            &["rollout", "list"],
            &["rollout", "show", "ID"],
            &["token", "list"],
            &["dr", "impact", "--zone", "dc1", "--by", "role"],
            &["dr", "report", "--by", "role"],
            &[
                "machines",
                "quarantine",
                DEMO_MACHINES[DEMO_MACHINES.len() - 1].hostname,
                "--reason",
                "demo",
            ],
            &["access", "status"],
            &["status"],
        ] {
            say!("  {}", self.flottectl_command_line(args)?);
        }
        say!(
            "Or watch it in a browser (the dashboard prints a URL carrying its secret):\n  {}",
            self.flottectl_command_line(&["ui", "--open"])?
        );
        say!("Logs: {}/*/*.log", self.root.display());
        Ok(())
    }

    /// Reprints the fleet every `FLEET_REFRESH_INTERVAL` until a stop is
    /// requested, or fails if a process of the fleet exits by itself.
    fn watch(&mut self) -> Result<(), DemoError> {
        say!(
            "\nReprinting the fleet every {}s. Press Ctrl-C to stop.",
            FLEET_REFRESH_INTERVAL.as_secs()
        );
        loop {
            let mut exited = None;
            let stop = self.stop.clone();
            wait_until(FLEET_REFRESH_INTERVAL, || {
                exited = self.exited_process();
                exited.is_some() || stop.is_requested()
            });
            self.stop.check()?;
            if let Some(process) = exited {
                return Err(DemoError::Failed(format!(
                    "{process} exited unexpectedly\n{}",
                    self.all_logs()
                )));
            }
            say!(
                "\n--- fleet at {} ---",
                humantime::format_rfc3339_seconds(SystemTime::now())
            );
            self.print_fleet()?;
        }
    }

    /// SIGTERM to the agents, then to the server (so that the agents do not
    /// log a lost server), waiting for each. True if all stopped cleanly.
    fn shut_down(&mut self) -> bool {
        let mut clean = true;
        for agent in &mut self.agents {
            let status = agent.terminate(STOP_TIMEOUT);
            clean &= status.is_some_and(|status| status.success());
            say!("agent {}: {}", agent.name, describe_exit(status));
        }
        if let Some(server) = &mut self.server {
            let status = server.terminate(STOP_TIMEOUT);
            clean &= status.is_some_and(|status| status.success());
            say!("server: {}", describe_exit(status));
        }
        clean
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stop = StopRequest::default();
    // One worker thread: it only waits for signals.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flotte-demo: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = listen_for_stop_signals(&runtime, stop.clone()) {
        eprintln!("flotte-demo: cannot install the signal handlers: {error}");
        return ExitCode::FAILURE;
    }
    let data_root = match DataRoot::prepare(cli.dir) {
        Ok(data_root) => data_root,
        Err(DemoError::Failed(message)) => {
            eprintln!("flotte-demo: {message}");
            return ExitCode::from(2);
        }
        Err(DemoError::Stopped) => return ExitCode::SUCCESS,
    };
    say!("flotte-demo: fleet data in {}", data_root.path().display());

    let mut demo = Demo {
        root: data_root.path().to_owned(),
        stop,
        server: None,
        agents: Vec::new(),
        keys: PathBuf::new(),
    };
    let outcome = demo.run_steps().and_then(|()| demo.watch());
    let failure = match outcome {
        Ok(()) | Err(DemoError::Stopped) => None,
        Err(DemoError::Failed(message)) => Some(message),
    };
    if let Some(message) = &failure {
        eprintln!("\nflotte-demo: {message}");
    }
    say!("\nstopping the fleet");
    let stopped_cleanly = demo.shut_down();
    match &data_root {
        DataRoot::Kept(path) => say!("fleet data kept in {}", path.display()),
        // TempDir keeps it when FLOTTE_KEEP_TEST_DIRS is set (debugging).
        DataRoot::Temporary(temporary) if std::env::var_os("FLOTTE_KEEP_TEST_DIRS").is_some() => {
            say!(
                "fleet data kept in {} (FLOTTE_KEEP_TEST_DIRS is set)",
                temporary.path().display()
            );
        }
        DataRoot::Temporary(temporary) => {
            say!("removing {}", temporary.path().display());
        }
    }
    drop(data_root);
    if failure.is_none() && stopped_cleanly {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
