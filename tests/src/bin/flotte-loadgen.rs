//! `flotte-loadgen`: measures what a running `flotte-server` — or several
//! replicas of it on one PostgreSQL — costs at fleet scale. It creates
//! multi-use join tokens through the admin API, enrolls N simulated agents
//! (each generates its own key and gets its own certificate over real
//! mutual TLS, exactly like `flotte-agent`), then holds N sessions at once
//! (one TLS connection each, the agent library's own session loop) and
//! samples each server's resident memory and CPU time from `/proc`.
//!
//! Given several server addresses, each simulated agent enrolls at and
//! starts on a random one and moves to the next when a session fails, as
//! real agents do; admin calls go to `--admin-server`. With
//! `--kill-server-pid` it then SIGKILLs one replica and times the agents'
//! return to the survivors.
//!
//! Simulated agents differ from real ones only in where they persist: in
//! memory ([`SimulatedAgentMemory`]) instead of a data dir, so that thousands
//! fit in one process. Everything on the wire is the real protocol. The run is
//! bounded in agents and time and meant for loopback; see BENCHMARKS.md for
//! how the published figures were taken.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Parser;
use flotte_agent::backoff::Backoff;
use flotte_agent::enroll::{enroll, EnrollError};
use flotte_agent::identity::MachineIdentity;
use flotte_agent::session::{run_session, AgentState, ImageManager, SessionEnd, SessionStats};
use flotte_agent::state::{AppliedState, Persistence, PersistenceError};
use flotte_common::profile::{Profile, ProfileError};
use flotte_proto::join_token::{JoinToken, JoinTokenError};
use flotte_proto::transport::{channel, client_config, explain_status, TransportError};
use flotte_proto::v1::rollouts_client::RolloutsClient;
use flotte_proto::v1::tokens_client::TokensClient;
use flotte_proto::v1::{
    CreateRolloutRequest, CreateTokenRequest, ListRolloutsRequest, RolloutRequest,
};
use flotte_server::limits::{raise_open_files_limit, LimitsError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Transient enrollment failures (a handshake that timed out while the
/// server was saturated) are retried this many times before the run fails.
const ENROLL_ATTEMPTS: u32 = 3;
const ENROLL_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Report interval a simulated agent uses until the server sends its own,
/// the same default as the real agent's.
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Simulated agents reconnect like real ones after a dropped session, but
/// with a shorter cap: the run is bounded in time.
const RECONNECT_INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const RECONNECT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Only the first few session failures are printed; the rest are counted.
const PRINTED_SESSION_FAILURES: u64 = 10;
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// After cancellation, sessions get this long to end before we stop waiting.
const SESSION_END_GRACE: Duration = Duration::from_secs(30);
const TOKEN_LABEL_KEY: &str = "fleet";
const TOKEN_LABEL_VALUE: &str = "loadgen";

#[derive(Debug, Parser)]
#[command(
    name = "flotte-loadgen",
    about = "Enroll and connect N simulated agents to a running flotte-server, and measure it"
)]
struct LoadgenArguments {
    /// Admin operator profile directory (e.g. <server-data-dir>/admin).
    #[arg(long)]
    profile: PathBuf,
    /// Server addresses (host:port; comma-separated or repeated) the
    /// simulated agents use: each starts at a random one and moves to the
    /// next when its session fails. Default: the profile's.
    #[arg(long = "server", value_delimiter = ',')]
    servers: Vec<String>,
    /// Address for the admin calls (join tokens, rollout, access revocation).
    /// Default: the first --server (or the profile's).
    #[arg(long)]
    admin_server: Option<String>,
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    agents: u32,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    enroll_concurrency: u32,
    /// Session connections (TLS handshake until the first desired state) in
    /// flight at once; more would only pile up behind the server's handshakes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    connect_concurrency: u32,
    /// How long the measurement window lasts once every session is up (the
    /// report interval itself is the server's: its desired state sets it).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Wait after the last session is established before measuring, so that
    /// the window sees steady reports and not the tail of the connect storm.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Fail if not every session is established within this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Process ids of the servers (comma-separated or repeated), to sample
    /// their RSS and CPU time from /proc.
    #[arg(long = "server-pid", value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// Process id of the PostgreSQL postmaster the replicas share: the CPU
    /// time of it and every process it started is summed over the window.
    #[arg(long)]
    postgres_pid: Option<u32>,
    /// At the end, SIGKILL this server process (one of --server-pid, holding
    /// some of the sessions) and time until every agent is connected again
    /// through the others.
    #[arg(long)]
    kill_server_pid: Option<u32>,
    /// Number of zones; agents are spread over them round-robin, one join
    /// token per zone.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    zones: u32,
    /// After the window, run a staged rollout of this pushed image
    /// (name@version) across the simulated fleet, whose agents answer every
    /// swap at once (simulated swaps: nothing is downloaded); measures wave
    /// transitions and the rollout's orchestration overhead.
    #[arg(long)]
    rollout_image: Option<String>,
    /// Machines per wave of that rollout: a count or a percentage ("1%").
    #[arg(long, default_value = "1%")]
    rollout_batch: String,
    /// Before the measurement window: add a user, grant it on every
    /// simulated machine, then `user revoke` it and measure the time from the
    /// revoke call returning to each agent's acknowledgement.
    #[arg(long)]
    revoke_access: bool,
    /// Churn: this many sessions a minute (on average, at random agents)
    /// end on the agent's side and reconnect at once, as machines
    /// rebooting or networks blinking would do (the soak uses it).
    #[arg(long, default_value_t = 0)]
    churn_per_minute: u32,
}

#[derive(Debug, thiserror::Error)]
enum LoadgenError {
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("creating a join token failed: {}", explain_status(.0))]
    CreateToken(tonic::Status),
    #[error("the server returned a join token that does not parse: {0}")]
    BadToken(#[from] JoinTokenError),
    #[error("enrolling simulated agent {hostname} failed: {source}")]
    Enroll {
        hostname: String,
        source: EnrollError,
    },
    #[error("a load generator task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("only {established} of {expected} sessions were established within {timeout:?}")]
    ConnectTimeout {
        established: usize,
        expected: usize,
        timeout: Duration,
    },
    #[error("cannot read {path}: {message}")]
    Proc { path: String, message: String },
    #[error("interrupted")]
    Interrupted,
    #[error("the rollout benchmark failed: {}", explain_status(.0))]
    Rollout(tonic::Status),
    #[error("the rollout ended {state}: {reason}")]
    RolloutEnded { state: String, reason: String },
    #[error("access revocation measurement: {0}")]
    Access(String),
    #[error("reconnect storm: {0}")]
    Reconnect(String),
}

// Not a binary of its own: cargo treats only `src/bin/*.rs` and
// `src/bin/*/main.rs` as binaries.
#[path = "loadgen/access_revocation.rs"]
mod access_revocation;
#[path = "loadgen/replicas.rs"]
mod replicas;
#[path = "loadgen/simulated.rs"]
mod simulated;

use replicas::ServerProcesses;
use simulated::{SimulatedAckLog, SimulatedImages, SimulatedSwapLog};

/// In-memory stand-in for a simulated agent's data dir: it keeps what the
/// session asks to persist (renewed certificate, applied desired state) so
/// that the session code runs unchanged, without thousands of directories.
#[derive(Debug, Default)]
struct SimulatedAgentMemory {
    certificate_pem: Mutex<Option<String>>,
    applied: Mutex<Option<AppliedState>>,
}

impl Persistence for SimulatedAgentMemory {
    fn save_certificate(&self, identity: &MachineIdentity) -> Result<(), PersistenceError> {
        // A poisoned slot still holds a whole value: every write replaces it.
        *self
            .certificate_pem
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(identity.certificate_pem.clone());
        Ok(())
    }

    fn save_applied(&self, applied: &AppliedState) -> Result<(), PersistenceError> {
        *self.applied.lock().unwrap_or_else(PoisonError::into_inner) = Some(applied.clone());
        Ok(())
    }
}

/// A join token and the zone it enrolls machines into.
#[derive(Debug, Clone)]
struct ZoneToken {
    zone: String,
    token: JoinToken,
}

/// An enrolled simulated agent, ready to open its session.
#[derive(Debug)]
struct SimulatedAgent {
    hostname: String,
    identity: MachineIdentity,
    /// Index of the server address it enrolled at and starts its sessions on.
    first_server: usize,
}

/// How many of `agents` fall into zone `zone_index` when dealt round-robin.
fn agents_in_zone(agents: u32, zones: u32, zone_index: u32) -> u32 {
    agents / zones + u32::from(zone_index < agents % zones)
}

/// Creates one multi-use join token per zone through the admin API.
async fn create_zone_tokens(
    profile: &Profile,
    address: &str,
    agents: u32,
    zones: u32,
    lifetime: Duration,
) -> Result<Vec<ZoneToken>, LoadgenError> {
    let tls = client_config(
        &profile.ca_pem,
        Some((&profile.certificate_pem, &profile.key_pem)),
    )?;
    let mut client = TokensClient::new(channel(address, Arc::new(tls))?);
    let mut tokens = Vec::new();
    for zone_index in 0..zones {
        let uses = agents_in_zone(agents, zones, zone_index);
        if uses == 0 {
            continue;
        }
        let zone = format!("zone-{}", zone_index + 1);
        let response = client
            .create_token(CreateTokenRequest {
                labels: [(TOKEN_LABEL_KEY.to_owned(), TOKEN_LABEL_VALUE.to_owned())]
                    .into_iter()
                    .collect(),
                zone: zone.clone(),
                ttl_seconds: lifetime.as_secs().max(1),
                uses,
            })
            .await
            .map_err(LoadgenError::CreateToken)?
            .into_inner();
        tokens.push(ZoneToken {
            zone,
            token: response.token.parse()?,
        });
    }
    Ok(tokens)
}

/// Enrolls one simulated agent, retrying transient failures a few times.
async fn enroll_simulated_agent(
    servers: &[String],
    zone_token: &ZoneToken,
    hostname: String,
) -> Result<SimulatedAgent, LoadgenError> {
    // A random first server, as a real agent picks one from its list.
    let first_server = flotte_agent::backoff::random_index(servers.len());
    let address = servers.get(first_server).map_or("", String::as_str);
    let mut attempt = 1;
    loop {
        match enroll(address, &zone_token.token, &hostname).await {
            Ok(identity) => {
                return Ok(SimulatedAgent {
                    hostname,
                    identity,
                    first_server,
                })
            }
            Err(error) if error.is_transient() && attempt < ENROLL_ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(ENROLL_RETRY_DELAY).await;
            }
            Err(source) => return Err(LoadgenError::Enroll { hostname, source }),
        }
    }
}

/// Prints `label: done/total` every few seconds until `stop` is cancelled.
fn spawn_progress_printer(
    label: &'static str,
    done: Arc<AtomicUsize>,
    total: usize,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(PROGRESS_INTERVAL) => {}
            }
            eprintln!(
                "  {label}: {}/{total} after {:.0} s",
                done.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
        }
    });
}

/// Enrolls `agents` simulated agents, at most `concurrency` at a time, dealt
/// round-robin over the zone tokens, each at a random one of `servers`.
async fn enroll_fleet(
    servers: &Arc<[String]>,
    zone_tokens: &[ZoneToken],
    agents: u32,
    concurrency: u32,
) -> Result<Vec<SimulatedAgent>, LoadgenError> {
    let enrollment_slots = Arc::new(Semaphore::new(concurrency as usize));
    let enrolled_count = Arc::new(AtomicUsize::new(0));
    let progress_stop = CancellationToken::new();
    let _stop_progress_on_return = progress_stop.clone().drop_guard();
    spawn_progress_printer(
        "enrolled",
        Arc::clone(&enrolled_count),
        agents as usize,
        progress_stop,
    );
    let mut enrollments = JoinSet::new();
    for index in 0..agents {
        let Some(zone_token) = zone_tokens
            .get(index as usize % zone_tokens.len().max(1))
            .cloned()
        else {
            break;
        };
        let servers = Arc::clone(servers);
        let enrollment_slots = Arc::clone(&enrollment_slots);
        let enrolled_count = Arc::clone(&enrolled_count);
        enrollments.spawn(async move {
            // The semaphore is never closed, so acquiring only fails if it
            // were; then enrolling without a slot is still correct.
            let _slot = enrollment_slots.acquire_owned().await.ok();
            let hostname = format!("loadgen-{}-{index:05}", zone_token.zone);
            let agent = enroll_simulated_agent(&servers, &zone_token, hostname).await;
            enrolled_count.fetch_add(1, Ordering::Relaxed);
            agent
        });
    }
    let mut fleet = Vec::with_capacity(agents as usize);
    while let Some(joined) = enrollments.join_next().await {
        // Returning drops the JoinSet, which aborts every other enrollment.
        fleet.push(joined??);
    }
    Ok(fleet)
}

/// Counters shared by every simulated agent's session task.
#[derive(Debug, Default)]
struct FleetCounters {
    /// Agents whose session was established at least once.
    established: AtomicUsize,
    /// Sessions that ended (or failed to open) other than by our shutdown.
    session_failures: AtomicU64,
    /// Agents whose session is established right now.
    connected: AtomicUsize,
    /// Sessions ended on purpose by `--churn-per-minute` (and reopened).
    churned: AtomicU64,
}

/// How simulated agents dial: the servers, the handshake slots, and, when
/// churning, the mean lifetime of a session.
struct Dialing {
    servers: Arc<[String]>,
    connect_slots: Arc<Semaphore>,
    churn_mean_lifetime: Option<Duration>,
}

/// What one simulated agent did, returned when its task ends.
#[derive(Debug, Clone, Copy, Default)]
struct SimulatedAgentOutcome {
    stats: SessionStats,
    report_interval_seconds: u32,
}

/// Keeps one simulated agent's session up until `shutdown`, reconnecting with
/// the agent's own backoff when it drops, to the next server address (as the
/// real agent does).
async fn run_simulated_agent(
    dialing: Arc<Dialing>,
    agent: SimulatedAgent,
    ack_log: Arc<SimulatedAckLog>,
    counters: Arc<FleetCounters>,
    swaps: Option<Arc<SimulatedSwapLog>>,
    shutdown: CancellationToken,
) -> SimulatedAgentOutcome {
    let memory = SimulatedAgentMemory::default();
    let images = swaps.map(|log| {
        Arc::new(SimulatedImages::new(agent.identity.machine_id, log)) as Arc<dyn ImageManager>
    });
    let mut state = AgentState {
        quarantine: None,
        identity: agent.identity,
        applied: AppliedState::default(),
        hostname: Some(agent.hostname),
        default_report_interval: DEFAULT_REPORT_INTERVAL,
        // Simulated agents run no checks: reports carry no health, as an
        // agent without checks would.
        health: flotte_agent::health::idle_health(),
        metrics: flotte_agent::metrics::AgentMetrics::new(),
        images,
        identity_watch: None,
        access: Some(ack_log),
        integrity: None,
    };
    let mut stats = SessionStats::default();
    let mut backoff = Backoff::new(RECONNECT_INITIAL_BACKOFF, RECONNECT_MAX_BACKOFF);
    let mut ever_established = false;
    let mut server_index = agent.first_server;
    loop {
        let address = &dialing.servers[server_index % dialing.servers.len().max(1)];
        let permit: Option<OwnedSemaphorePermit> = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&dialing.connect_slots).acquire_owned() => permit.ok(),
        };
        // The slot is given back as soon as the server answers the hello, so
        // it bounds handshakes in flight, not sessions.
        let mut connect_slot = permit;
        let mut established_this_time = false;
        let mut on_established = || {
            connect_slot.take();
            established_this_time = true;
            counters.connected.fetch_add(1, Ordering::Relaxed);
            if !ever_established {
                ever_established = true;
                counters.established.fetch_add(1, Ordering::Relaxed);
            }
        };
        // Churn ends this session after a random lifetime (uniform up to
        // twice the mean), as if the machine rebooted.
        let session_end = shutdown.child_token();
        let churn_timer = dialing.churn_mean_lifetime.map(|mean| {
            let lifetime = mean.mul_f64(2.0 * flotte_agent::backoff::random_unit());
            let end = session_end.clone();
            tokio::spawn(async move {
                tokio::time::sleep(lifetime).await;
                end.cancel();
            })
        });
        let outcome = run_session(
            address,
            &mut state,
            &memory,
            &mut stats,
            &session_end,
            &mut on_established,
        )
        .await;
        if let Some(timer) = churn_timer {
            timer.abort();
        }
        drop(connect_slot);
        if established_this_time {
            counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
        let failure = match outcome {
            Ok(SessionEnd::Shutdown) if shutdown.is_cancelled() => break,
            Ok(SessionEnd::Shutdown) => {
                counters.churned.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(SessionEnd::ClosedByServer(reason)) => format!("closed by the server: {reason}"),
            Err(error) => error.to_string(),
        };
        let failures_so_far = counters.session_failures.fetch_add(1, Ordering::Relaxed);
        if failures_so_far < PRINTED_SESSION_FAILURES {
            eprintln!("  session of {} ended: {failure}", state.identity.identity);
        }
        if established_this_time {
            backoff.reset();
        }
        server_index = server_index.wrapping_add(1);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    SimulatedAgentOutcome {
        stats,
        report_interval_seconds: state.applied.report_interval_seconds,
    }
}

/// The value at percentile `p` (0..=1) of sorted `values`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One staged rollout across the simulated fleet, timed.
struct RolloutBenchmark<'a> {
    profile: &'a Profile,
    address: &'a str,
    image: &'a str,
    batch: &'a str,
    servers: &'a ServerProcesses,
}

impl RolloutBenchmark<'_> {
    async fn run(&self, log: &SimulatedSwapLog) -> Result<(), LoadgenError> {
        let tls = client_config(
            &self.profile.ca_pem,
            Some((&self.profile.certificate_pem, &self.profile.key_pem)),
        )?;
        let mut client = RolloutsClient::new(channel(self.address, Arc::new(tls))?);
        let batch = if self.batch.ends_with('%') {
            format!("{:?}", self.batch)
        } else {
            self.batch.to_owned()
        };
        let plan_toml = format!(
            "[[stage]]\nname = \"all\"\nselector = \"{TOKEN_LABEL_KEY}={TOKEN_LABEL_VALUE}\"\nbatch = {batch}\n\n[policy]\nmax_failures = \"1%\"\nmachine_deadline = \"10m\"\non_failure = \"halt\"\n"
        );
        let servers_before = self.servers.sample()?;
        let started = Instant::now();
        let created = client
            .create_rollout(CreateRolloutRequest {
                image: self.image.to_owned(),
                plan_toml,
                dry_run: false,
                force: false,
            })
            .await
            .map_err(LoadgenError::Rollout)?
            .into_inner();
        let id = created
            .rollout
            .map(|rollout| rollout.id)
            .unwrap_or_default();
        let created_after = started.elapsed();
        let (state, reason) = loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let listed = client
                .list_rollouts(ListRolloutsRequest {})
                .await
                .map_err(LoadgenError::Rollout)?
                .into_inner();
            if let Some(rollout) = listed.rollouts.iter().find(|rollout| rollout.id == id) {
                if matches!(
                    rollout.state.as_str(),
                    "succeeded" | "failed" | "aborted" | "rolled_back"
                ) {
                    break (rollout.state.clone(), rollout.reason.clone());
                }
            }
        };
        let total = started.elapsed();
        let servers_after = self.servers.sample()?;
        if state != "succeeded" {
            return Err(LoadgenError::RolloutEnded { state, reason });
        }
        let detail = client
            .get_rollout(RolloutRequest { id: id.clone() })
            .await
            .map_err(LoadgenError::Rollout)?
            .into_inner();
        let swaps = log.swaps();
        // Per wave: the first and last desired image received, the last commit.
        let mut waves: BTreeMap<u32, (Instant, Instant, Instant)> = BTreeMap::new();
        let mut missing = 0usize;
        for machine in &detail.machines {
            let Some(&(received, committed)) = Uuid::parse_str(&machine.machine_id)
                .ok()
                .and_then(|id| swaps.get(&id))
            else {
                missing += 1;
                continue;
            };
            let entry = waves
                .entry(machine.wave)
                .or_insert((received, received, committed));
            entry.0 = entry.0.min(received);
            entry.1 = entry.1.max(received);
            entry.2 = entry.2.max(committed);
        }
        let mut first_sent = Vec::new();
        let mut whole_wave_sent = Vec::new();
        let wave_list: Vec<&(Instant, Instant, Instant)> = waves.values().collect();
        for pair in wave_list.windows(2) {
            let (previous, next) = (pair[0], pair[1]);
            first_sent.push(next.0.saturating_duration_since(previous.2).as_secs_f64() * 1000.0);
            whole_wave_sent
                .push(next.1.saturating_duration_since(previous.2).as_secs_f64() * 1000.0);
        }
        first_sent.sort_by(f64::total_cmp);
        whole_wave_sent.sort_by(f64::total_cmp);
        println!(
            "rollout {} of {}: {} machines in {} waves of {}; {state} in {:.2} s (create answered in {:.0} ms); {missing} machine(s) without a recorded swap",
            &id[..id.len().min(8)],
            self.image,
            detail.machine_count,
            detail.wave_count,
            self.batch,
            total.as_secs_f64(),
            created_after.as_secs_f64() * 1000.0,
        );
        println!(
            "wave transition (last commit of wave N → first desired image of wave N+1 at an agent), {} transitions: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            first_sent.len(),
            percentile(&first_sent, 0.5),
            percentile(&first_sent, 0.9),
            percentile(&first_sent, 0.99),
            first_sent.last().copied().unwrap_or(0.0)
        );
        println!(
            "whole next wave sent (last commit of wave N → last desired image of wave N+1): p50 {:.1} ms, p99 {:.1} ms",
            percentile(&whole_wave_sent, 0.5),
            percentile(&whole_wave_sent, 0.99)
        );
        let overhead_per_wave = total.as_secs_f64() * 1000.0 / f64::from(detail.wave_count.max(1));
        println!(
            "orchestration overhead (no bake, swaps answered at once): {:.2} s for the whole rollout, {overhead_per_wave:.1} ms per wave",
            total.as_secs_f64()
        );
        for ((who, before), after) in self
            .servers
            .labels()
            .zip(&servers_before)
            .zip(&servers_after)
        {
            let seconds =
                after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / clock_ticks_per_second();
            println!(
                "{who} CPU during the rollout: {seconds:.2} s ({:.0}% of one core); RSS {:.1} MiB after",
                100.0 * seconds / total.as_secs_f64().max(f64::EPSILON),
                mebibytes(after.resident_kib)
            );
        }
        Ok(())
    }
}

/// Resident memory and CPU time of one process, from /proc.
#[derive(Debug, Clone, Copy)]
struct ProcessSample {
    resident_kib: u64,
    /// Peak RSS since the process started (VmHWM): covers the enrollment
    /// and connect storms, which the measurement window does not.
    peak_resident_kib: u64,
    cpu_ticks: u64,
    threads: u64,
    taken_at: Instant,
}

fn read_proc_file(path: &str) -> Result<String, LoadgenError> {
    std::fs::read_to_string(path).map_err(|error| LoadgenError::Proc {
        path: path.to_owned(),
        message: error.to_string(),
    })
}

/// The number of the `field:` line of /proc/PID/status (e.g. `VmRSS:  123 kB`).
fn status_field(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
}

/// utime + stime (fields 14 and 15) of /proc/PID/stat. The command name
/// (field 2) may contain spaces and parentheses, so fields are counted after
/// its last ')': there the first one is field 3.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_command = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_command.split_whitespace().skip(14 - 3);
    let user_ticks: u64 = fields.next()?.parse().ok()?;
    let system_ticks: u64 = fields.next()?.parse().ok()?;
    Some(user_ticks + system_ticks)
}

/// Samples `/proc/<process>/` where `process` is a pid or `self`.
fn sample_process(process: &str) -> Result<ProcessSample, LoadgenError> {
    let status_path = format!("/proc/{process}/status");
    let stat_path = format!("/proc/{process}/stat");
    let status = read_proc_file(&status_path)?;
    let stat = read_proc_file(&stat_path)?;
    let unparsable = |path: &str, what: &str| LoadgenError::Proc {
        path: path.to_owned(),
        message: format!("no {what}"),
    };
    Ok(ProcessSample {
        resident_kib: status_field(&status, "VmRSS")
            .ok_or_else(|| unparsable(&status_path, "VmRSS"))?,
        peak_resident_kib: status_field(&status, "VmHWM").unwrap_or(0),
        threads: status_field(&status, "Threads").unwrap_or(0),
        cpu_ticks: stat_cpu_ticks(&stat).ok_or_else(|| unparsable(&stat_path, "utime/stime"))?,
        taken_at: Instant::now(),
    })
}

/// Busy CPU ticks of the whole machine, summed over every core, from the
/// first line of /proc/stat (`cpu user nice system idle iowait irq softirq
/// steal ...`): everything but idle and iowait. Guest time is already counted
/// inside user time, so the later columns are left out.
fn busy_ticks_from_proc_stat(proc_stat: &str) -> Option<u64> {
    let counters = proc_stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|value| value.parse::<u64>().ok())
        .collect::<Option<Vec<u64>>>()?;
    let idle_and_iowait = counters.get(3)? + counters.get(4)?;
    Some(counters.iter().sum::<u64>() - idle_and_iowait)
}

/// Busy ticks of the whole machine: compared with the server's and our own
/// CPU time, it shows whether other work (a build, say) shared the machine
/// during the window and so disturbed the figures.
fn machine_busy_ticks() -> Result<u64, LoadgenError> {
    let path = "/proc/stat";
    busy_ticks_from_proc_stat(&read_proc_file(path)?).ok_or_else(|| LoadgenError::Proc {
        path: path.to_owned(),
        message: "no cpu line".to_owned(),
    })
}

/// Kernel clock ticks per second, the unit of utime/stime.
fn clock_ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        // Tick rates are small integers; the conversion is exact.
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        // 100 is what Linux reports on every architecture it runs on.
        _ => 100.0,
    }
}

fn mebibytes(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Prints one process's figures over a measurement window.
fn print_process_window(
    who: &str,
    first: &ProcessSample,
    last: &ProcessSample,
    peak_resident_kib: u64,
    baseline_resident_kib: Option<u64>,
    agents: usize,
) {
    let seconds = last.taken_at.duration_since(first.taken_at).as_secs_f64();
    let cpu_seconds =
        last.cpu_ticks.saturating_sub(first.cpu_ticks) as f64 / clock_ticks_per_second();
    let cpu_percent = if seconds > 0.0 {
        100.0 * cpu_seconds / seconds
    } else {
        0.0
    };
    println!(
        "{who}: RSS {:.1} MiB at window start, {:.1} MiB at end, peak {:.1} MiB in the window, {:.1} MiB since the process started; {} threads",
        mebibytes(first.resident_kib),
        mebibytes(last.resident_kib),
        mebibytes(peak_resident_kib),
        mebibytes(last.peak_resident_kib),
        last.threads
    );
    if let Some(baseline) = baseline_resident_kib {
        let per_agent = last.resident_kib.saturating_sub(baseline) as f64 / agents.max(1) as f64;
        println!(
            "{who}: {:.1} MiB before load, so {per_agent:.1} KiB per connected agent",
            mebibytes(baseline)
        );
    }
    println!(
        "{who}: CPU {cpu_percent:.1}% of one core ({cpu_seconds:.2} s of CPU over {seconds:.1} s)"
    );
}

async fn run_load(arguments: LoadgenArguments) -> Result<(), LoadgenError> {
    let profile = Profile::load(&arguments.profile)?;
    let servers: Arc<[String]> = if arguments.servers.is_empty() {
        Arc::from([profile.settings.server.clone()])
    } else {
        Arc::from(arguments.servers.clone())
    };
    let address: Arc<str> = Arc::from(
        arguments
            .admin_server
            .clone()
            .unwrap_or_else(|| servers[0].clone()),
    );
    if servers.len() > 1 {
        println!(
            "agents spread over {} servers ({}); admin calls through {address}",
            servers.len(),
            servers.join(", ")
        );
    }
    let agents = arguments.agents as usize;
    let server_processes = ServerProcesses::new(&arguments.server_pids);
    let server_baselines = server_processes.sample()?;
    for (who, baseline) in server_processes.labels().zip(&server_baselines) {
        println!(
            "{who} before load: RSS {:.1} MiB, {} threads",
            mebibytes(baseline.resident_kib),
            baseline.threads
        );
    }

    // Tokens outlive every phase of the run, with margin for a slow machine.
    let token_lifetime = arguments.connect_timeout
        + arguments.settle
        + arguments.duration
        + Duration::from_secs(3600);
    let zone_tokens = create_zone_tokens(
        &profile,
        &address,
        arguments.agents,
        arguments.zones,
        token_lifetime,
    )
    .await?;
    println!(
        "created {} join token(s) for zones {}",
        zone_tokens.len(),
        zone_tokens
            .iter()
            .map(|zone_token| zone_token.zone.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let enrollment_started = Instant::now();
    let fleet = enroll_fleet(
        &servers,
        &zone_tokens,
        arguments.agents,
        arguments.enroll_concurrency,
    )
    .await?;
    let enrollment_seconds = enrollment_started.elapsed().as_secs_f64();
    println!(
        "enrolled {} agents in {enrollment_seconds:.1} s: {:.0} agents/s (concurrency {})",
        fleet.len(),
        fleet.len() as f64 / enrollment_seconds.max(f64::EPSILON),
        arguments.enroll_concurrency
    );

    let counters = Arc::new(FleetCounters::default());
    let dialing = Arc::new(Dialing {
        servers: Arc::clone(&servers),
        connect_slots: Arc::new(Semaphore::new(arguments.connect_concurrency as usize)),
        // K sessions a minute among N agents: each lives N/K minutes on average.
        churn_mean_lifetime: (arguments.churn_per_minute > 0).then(|| {
            Duration::from_secs(60)
                .mul_f64(f64::from(arguments.agents) / f64::from(arguments.churn_per_minute))
        }),
    });
    let shutdown = CancellationToken::new();
    // Dropping the guard on any early return ends every session.
    let shutdown_guard = shutdown.clone().drop_guard();
    let connect_started = Instant::now();
    let swap_log = arguments
        .rollout_image
        .as_ref()
        .map(|_| Arc::new(SimulatedSwapLog::default()));
    let mut sessions = JoinSet::new();
    let ack_logs: Vec<Arc<SimulatedAckLog>> = (0..fleet.len())
        .map(|_| Arc::new(SimulatedAckLog::default()))
        .collect();
    for (agent, ack_log) in fleet.into_iter().zip(&ack_logs) {
        sessions.spawn(run_simulated_agent(
            Arc::clone(&dialing),
            agent,
            Arc::clone(ack_log),
            Arc::clone(&counters),
            swap_log.clone(),
            shutdown.clone(),
        ));
    }
    let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
    progress.tick().await;
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        let established = counters.established.load(Ordering::Relaxed);
        if established >= agents {
            break;
        }
        if connect_started.elapsed() >= arguments.connect_timeout {
            return Err(LoadgenError::ConnectTimeout {
                established,
                expected: agents,
                timeout: arguments.connect_timeout,
            });
        }
        tokio::select! {
            _ = progress.tick() => eprintln!(
                "  established: {established}/{agents} after {:.0} s",
                connect_started.elapsed().as_secs_f64()
            ),
            _ = poll.tick() => {}
        }
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    println!(
        "established {agents} sessions in {connect_seconds:.1} s: {:.0} sessions/s (concurrency {}); {} session failure(s) on the way",
        agents as f64 / connect_seconds.max(f64::EPSILON),
        arguments.connect_concurrency,
        counters.session_failures.load(Ordering::Relaxed)
    );

    tokio::time::sleep(arguments.settle).await;
    if arguments.revoke_access {
        access_revocation::measure(&profile, &address, &ack_logs).await?;
    }
    let failures_before_window = counters.session_failures.load(Ordering::Relaxed);
    let servers_first = server_processes.sample()?;
    let postgres_first = arguments
        .postgres_pid
        .map(replicas::postgres_cpu_ticks)
        .transpose()?;
    let own_first = sample_process("self")?;
    let machine_first = machine_busy_ticks()?;
    let mut server_peaks_kib: Vec<u64> = servers_first
        .iter()
        .map(|sample| sample.resident_kib)
        .collect();
    let mut own_peak_kib = own_first.resident_kib;
    let window_end = tokio::time::Instant::now() + arguments.duration;
    let mut rss_ticker = tokio::time::interval(RSS_SAMPLE_INTERVAL);
    while tokio::time::Instant::now() < window_end {
        tokio::select! {
            _ = rss_ticker.tick() => {}
            () = tokio::time::sleep_until(window_end) => {}
        }
        for (peak, sample) in server_peaks_kib.iter_mut().zip(server_processes.sample()?) {
            *peak = (*peak).max(sample.resident_kib);
        }
        own_peak_kib = own_peak_kib.max(sample_process("self")?.resident_kib);
    }
    let servers_last = server_processes.sample()?;
    let postgres_last = arguments
        .postgres_pid
        .map(replicas::postgres_cpu_ticks)
        .transpose()?;
    let own_last = sample_process("self")?;
    let machine_last = machine_busy_ticks()?;
    let failures_in_window = counters
        .session_failures
        .load(Ordering::Relaxed)
        .saturating_sub(failures_before_window);

    println!(
        "held {agents} sessions for a {:.0} s window after {:.0} s to settle; {failures_in_window} session failure(s) in the window; {} session(s) ended by churn and reopened",
        arguments.duration.as_secs_f64(),
        arguments.settle.as_secs_f64(),
        counters.churned.load(Ordering::Relaxed)
    );
    for (index, who) in server_processes.labels().enumerate() {
        let (first, last) = (&servers_first[index], &servers_last[index]);
        let peak = server_peaks_kib[index].max(last.resident_kib);
        let baseline = server_baselines[index].resident_kib;
        // Each replica holds its share of the agents; the per-agent figure
        // of one server alone would be misleading.
        let holding = if server_processes.len() == 1 {
            Some(baseline)
        } else {
            None
        };
        print_process_window(who, first, last, peak, holding, agents);
    }
    let mut postgres_ticks = 0;
    if let (Some((first, _)), Some((last, processes))) = (postgres_first, postgres_last) {
        postgres_ticks = last.saturating_sub(first);
        let seconds = postgres_ticks as f64 / clock_ticks_per_second();
        let window = own_last
            .taken_at
            .duration_since(own_first.taken_at)
            .as_secs_f64()
            .max(f64::EPSILON);
        println!(
            "PostgreSQL (postmaster and its {processes} processes): CPU {:.1}% of one core ({seconds:.2} s of CPU over {window:.1} s)",
            100.0 * seconds / window
        );
    }
    print_process_window(
        "load generator",
        &own_first,
        &own_last,
        own_peak_kib.max(own_last.resident_kib),
        None,
        agents,
    );
    let window_ticks_per_second = clock_ticks_per_second()
        * own_last
            .taken_at
            .duration_since(own_first.taken_at)
            .as_secs_f64()
            .max(f64::EPSILON);
    let server_ticks: u64 = servers_first
        .iter()
        .zip(&servers_last)
        .map(|(first, last)| last.cpu_ticks.saturating_sub(first.cpu_ticks))
        .sum::<u64>()
        + postgres_ticks;
    let other_ticks = machine_last
        .saturating_sub(machine_first)
        .saturating_sub(server_ticks)
        .saturating_sub(own_last.cpu_ticks.saturating_sub(own_first.cpu_ticks));
    println!(
        "machine: {:.1}% of one core busy in the window (all {} cores together), of which other processes {:.1}%{}",
        100.0 * machine_last.saturating_sub(machine_first) as f64 / window_ticks_per_second,
        std::thread::available_parallelism().map_or(1, usize::from),
        100.0 * other_ticks as f64 / window_ticks_per_second,
        if server_processes.len() == 0 {
            " (including the server: no --server-pid)"
        } else {
            ""
        }
    );

    if let (Some(image), Some(log)) = (&arguments.rollout_image, &swap_log) {
        let rollout = RolloutBenchmark {
            profile: &profile,
            address: &address,
            image,
            batch: &arguments.rollout_batch,
            servers: &server_processes,
        };
        rollout.run(log).await?;
    }
    if let Some(pid) = arguments.kill_server_pid {
        replicas::measure_reconnect_storm(pid, &counters, agents, arguments.connect_timeout)
            .await?;
    }

    drop(shutdown_guard);
    let mut reports_sent = 0u64;
    let mut report_intervals = BTreeMap::<u32, usize>::new();
    let ended = tokio::time::timeout(SESSION_END_GRACE, async {
        while let Some(joined) = sessions.join_next().await {
            let outcome = joined?;
            reports_sent += outcome.stats.reports_sent;
            *report_intervals
                .entry(outcome.report_interval_seconds)
                .or_default() += 1;
        }
        Ok::<(), LoadgenError>(())
    })
    .await;
    match ended {
        Ok(result) => result?,
        Err(_) => {
            eprintln!("  some sessions did not end within {SESSION_END_GRACE:?}; leaving them")
        }
    }
    println!(
        "sessions cancelled; {reports_sent} reports sent in total; report interval set by the server (seconds: agents): {report_intervals:?}"
    );
    Ok(())
}

fn main() -> ExitCode {
    let arguments = LoadgenArguments::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Every simulated agent holds a socket; the default soft limit of 1 024
    // open files would cap the run long before anything interesting happens.
    match raise_open_files_limit() {
        Ok(limit) => println!(
            "open-files limit: {} (was {}; hard limit {})",
            limit.soft, limit.previous_soft, limit.hard
        ),
        Err(error) => {
            eprintln!("flotte-loadgen: {}", LoadgenError::from(error));
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flotte-loadgen: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        tokio::select! {
            result = run_load(arguments) => result,
            () = flotte_proto::signals::wait_for_termination() => Err(LoadgenError::Interrupted),
        }
    });
    // Ends any session task still running before the process exits.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flotte-loadgen: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_are_dealt_over_zones_without_loss() {
        let total: u32 = (0..3).map(|zone| agents_in_zone(10, 3, zone)).sum();
        assert_eq!(total, 10);
        assert_eq!(agents_in_zone(10, 3, 0), 4);
        assert_eq!(agents_in_zone(10, 3, 2), 3);
        assert_eq!(agents_in_zone(2, 3, 2), 0);
    }

    #[test]
    fn proc_parsing() {
        let status = "Name:\tflotte-server\nVmRSS:\t  123456 kB\nThreads:\t3\n";
        assert_eq!(status_field(status, "VmRSS"), Some(123_456));
        assert_eq!(status_field(status, "Threads"), Some(3));
        assert_eq!(status_field(status, "VmHWM"), None);
        let stat = "42 (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(stat_cpu_ticks(stat), Some(325));
        let proc_stat = "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n";
        assert_eq!(busy_ticks_from_proc_stat(proc_stat), Some(160));
        assert_eq!(busy_ticks_from_proc_stat("intr 1 2 3\n"), None);
    }
}
