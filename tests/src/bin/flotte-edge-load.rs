//! `flotte-edge-load`: attacks a running `flotte-server` the way anyone
//! without a certificate can — gRPC requests with random paths, thousands of
//! idle TLS connections without a client certificate, an `Enroll` flood with
//! bad tokens — and measures what it costs: the server's resident memory
//! (now and peak), the p99 of admin calls made meanwhile, the metrics series
//! the flood left behind, and connected agents lost.
//!
//! It is the neighbour of `flotte-loadgen`: run that one to hold N agents'
//! sessions (it reports its own session failures), and this one at the same
//! time; agents lost are read from the server's `flotte_connected_agents`.
//! The server must allow the loadgen's enrollments from one address (raise
//! the `[limits]` enrollment and per-source settings; see BENCHMARKS.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flotte_common::profile::{Profile, ProfileError};
use flotte_proto::transport::{channel, client_config, TransportError};
use flotte_proto::v1::enrollment_client::EnrollmentClient;
use flotte_proto::v1::machines_client::MachinesClient;
use flotte_proto::v1::{EnrollRequest, ListMachinesRequest};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How often the agents gauge is scraped and an admin call is timed.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Parser)]
#[command(
    name = "flotte-edge-load",
    about = "Flood a running flotte-server with unauthenticated traffic and measure it"
)]
struct EdgeLoadArguments {
    /// Admin operator profile directory (e.g. <server-data-dir>/admin).
    #[arg(long)]
    profile: PathBuf,
    /// Server address host:port, overriding the profile's.
    #[arg(long)]
    server: Option<String>,
    /// Address of the server's /metrics listener.
    #[arg(long)]
    metrics: String,
    /// Process id of the server, for its resident memory.
    #[arg(long)]
    server_pid: u32,
    /// Anonymous gRPC requests, each with a new random path.
    #[arg(long, default_value_t = 20_000)]
    random_paths: u32,
    /// TLS connections without a client certificate, opened and left idle.
    #[arg(long, default_value_t = 2_000)]
    idle_connections: u32,
    /// `Enroll` calls with a well-formed but unknown join token.
    #[arg(long, default_value_t = 5_000)]
    enroll_flood: u32,
    /// Requests (and connection attempts) in flight at once per flood.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Loopback source addresses the idle connections come from, spread
    /// round-robin over 127.0.1.1, 127.0.1.2…: more than one exercises the
    /// server-wide cap on anonymous connections, not only the per-source
    /// one (a server on 127.0.0.1 only; Linux routes all of 127/8 to `lo`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=254))]
    idle_sources: u32,
    /// How long idle connections are held open (at least).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    hold: Duration,
}

#[derive(Debug, thiserror::Error)]
enum EdgeLoadError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot scrape {address}/metrics: {reason}")]
    Scrape { address: String, reason: String },
    #[error("cannot read the server's memory from /proc/{pid}/status")]
    ServerMemory { pid: u32 },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Outcomes of one flood: how many requests ended how.
#[derive(Debug, Default)]
struct Tally {
    outcomes: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn add(&self, outcome: impl Into<String>) {
        let mut outcomes = self
            .outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *outcomes.entry(outcome.into()).or_default() += 1;
    }

    fn render(&self) -> String {
        let outcomes = self
            .outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        outcomes
            .iter()
            .map(|(outcome, count)| format!("{outcome}: {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Runs `total` calls of `one_call(index)` with `concurrency` in flight.
async fn flood<F, Fut>(total: u32, concurrency: u32, one_call: F)
where
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let one_call = Arc::new(one_call);
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let next = Arc::clone(&next);
        let one_call = Arc::clone(&one_call);
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                match u32::try_from(index) {
                    Ok(index) if index < total => one_call(index).await,
                    _ => return,
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

fn scrape_metrics(address: &str) -> Result<String, EdgeLoadError> {
    let scrape_error = |reason: String| EdgeLoadError::Scrape {
        address: address.to_owned(),
        reason,
    };
    match flotte_tests::http_get(address, "/metrics") {
        Ok((200, body)) => Ok(body),
        Ok((status, _)) => Err(scrape_error(format!("HTTP status {status}"))),
        Err(error) => Err(scrape_error(error.to_string())),
    }
}

/// The value of the unlabelled sample `name` in a Prometheus text page.
fn unlabelled_sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// (resident, peak resident) KiB of `pid`.
fn server_memory_kib(pid: u32) -> Result<(u64, u64), EdgeLoadError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| EdgeLoadError::ServerMemory { pid })?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.split_whitespace().next()?.parse::<u64>().ok())
    };
    match (field("VmRSS"), field("VmHWM")) {
        (Some(resident), Some(peak)) => Ok((resident, peak)),
        _ => Err(EdgeLoadError::ServerMemory { pid }),
    }
}

/// One anonymous call to a new random path; its outcome (a status code).
async fn random_path_call(channel: tonic::transport::Channel, index: u32) -> String {
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = format!("/flood{index}.{}/{}", uuid::Uuid::new_v4(), "x".repeat(512));
    match (grpc.ready().await, path.try_into()) {
        (Ok(()), Ok(path)) => grpc
            .unary::<(), (), _>(
                tonic::Request::new(()),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
            .map_or_else(|status| format!("{:?}", status.code()), |_| "OK".into()),
        _ => "not sent".into(),
    }
}

/// One `Enroll` with a well-formed join token the server never issued.
async fn bad_enrollment_call(mut client: EnrollmentClient<tonic::transport::Channel>) -> String {
    let request = EnrollRequest {
        join_token: format!(
            "flotte1.{}.{}.{}",
            "0".repeat(16),
            "0".repeat(32),
            "0".repeat(64)
        ),
        csr_pem: String::new(),
        hostname: "flood".into(),
    };
    client
        .enroll(request)
        .await
        .map_or_else(|status| format!("{:?}", status.code()), |_| "OK".into())
}

/// Connects to `address` from `source` (any when `None`).
async fn connect_from(
    address: &str,
    source: Option<std::net::Ipv4Addr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let Some(source) = source else {
        return tokio::net::TcpStream::connect(address).await;
    };
    let target = tokio::net::lookup_host(address)
        .await?
        .find(std::net::SocketAddr::is_ipv4)
        .ok_or_else(|| {
            std::io::Error::other("no IPv4 address to connect from a loopback source")
        })?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from((source, 0)))?;
    socket.connect(target).await
}

/// Opens one TLS connection without a client certificate (from `source`),
/// sends nothing, and reports whether the server closed it before `stop`.
async fn idle_connection(
    address: Arc<str>,
    source: Option<std::net::Ipv4Addr>,
    tls: Arc<rustls::ClientConfig>,
    stop: CancellationToken,
    tally: Arc<Tally>,
) {
    let host = address.rsplit_once(':').map_or(&*address, |(host, _)| host);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let Ok(server_name) = rustls::pki_types::ServerName::try_from(host) else {
        tally.add("bad server name");
        return;
    };
    let connected = match connect_from(&address, source).await {
        Ok(tcp) => tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .ok(),
        Err(_) => None,
    };
    let Some(mut stream) = connected else {
        tally.add("refused at connect or handshake");
        return;
    };
    let mut buffer = [0u8; 1024];
    let mut served = false;
    let closed = async {
        while let Ok(1..) = stream.read(&mut buffer).await {
            served = true;
        }
    };
    let outcome = tokio::select! {
        () = closed => "closed by the server",
        () = stop.cancelled() => "still open at the end",
    };
    tally.add(format!(
        "{outcome} ({})",
        if served { "served" } else { "never served" }
    ));
}

async fn measure(arguments: EdgeLoadArguments) -> Result<(), EdgeLoadError> {
    let profile = Profile::load(&arguments.profile)?;
    let address: Arc<str> = arguments
        .server
        .clone()
        .unwrap_or_else(|| profile.settings.server.clone())
        .into();
    let admin_tls = Arc::new(client_config(
        &profile.ca_pem,
        Some((&profile.certificate_pem, &profile.key_pem)),
    )?);
    let anonymous_tls = Arc::new(client_config(&profile.ca_pem, None)?);
    let metrics_address = arguments.metrics.clone();
    let scrape = move || scrape_metrics(&metrics_address);
    let connected_gauge = |text: &str| unlabelled_sample(text, "flotte_connected_agents");
    let agents_before = connected_gauge(&scrape()?).unwrap_or(0.0);
    let (resident_before, _) = server_memory_kib(arguments.server_pid)?;
    println!(
        "before: {agents_before} agents connected, server RSS {:.1} MiB",
        resident_before as f64 / 1024.0
    );

    // Samplers: the agents gauge and one admin call every SAMPLE_INTERVAL.
    let stop_sampling = CancellationToken::new();
    let sampler = {
        let stop = stop_sampling.clone();
        let scrape = scrape.clone();
        let mut machines = MachinesClient::new(channel(&address, admin_tls)?);
        tokio::spawn(async move {
            let mut fewest_agents = f64::MAX;
            let mut admin_latencies = Vec::new();
            let mut admin_failures = 0u64;
            let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let started = Instant::now();
                match machines.list_machines(ListMachinesRequest::default()).await {
                    Ok(_) => admin_latencies.push(started.elapsed()),
                    Err(_) => admin_failures += 1,
                }
                let scrape = scrape.clone();
                if let Ok(Ok(text)) = tokio::task::spawn_blocking(scrape).await {
                    if let Some(agents) = unlabelled_sample(&text, "flotte_connected_agents") {
                        fewest_agents = fewest_agents.min(agents);
                    }
                }
            }
            (fewest_agents, admin_latencies, admin_failures)
        })
    };

    // The floods' own connections are anonymous too: open them (one call
    // each) before the idle connections fill the anonymous cap, which would
    // otherwise shut them out.
    let paths_channel = channel(&address, Arc::clone(&anonymous_tls))?;
    let enroll_client = EnrollmentClient::new(channel(&address, Arc::clone(&anonymous_tls))?);
    println!(
        "warm-up: a random path answers {}, a bad enrollment {}",
        random_path_call(paths_channel.clone(), u32::MAX).await,
        bad_enrollment_call(enroll_client.clone()).await
    );

    let started = Instant::now();
    let paths = Arc::new(Tally::default());
    let enrollments = Arc::new(Tally::default());
    let idle = Arc::new(Tally::default());
    let stop_idle = CancellationToken::new();
    let idle_hold = {
        let (address, tls, stop, tally) = (
            Arc::clone(&address),
            Arc::clone(&anonymous_tls),
            stop_idle.clone(),
            Arc::clone(&idle),
        );
        let sources = arguments.idle_sources;
        let mut connections = JoinSet::new();
        for index in 0..arguments.idle_connections {
            // One source: the kernel's choice, as before.
            let source = (sources > 1).then(|| {
                let last = u8::try_from(1 + index % sources).unwrap_or(u8::MAX);
                std::net::Ipv4Addr::new(127, 0, 1, last)
            });
            connections.spawn(idle_connection(
                Arc::clone(&address),
                source,
                Arc::clone(&tls),
                stop.clone(),
                Arc::clone(&tally),
            ));
        }
        tokio::spawn(async move { while connections.join_next().await.is_some() {} })
    };
    let random_paths = {
        let tally = Arc::clone(&paths);
        flood(
            arguments.random_paths,
            arguments.concurrency,
            move |index| {
                let channel = paths_channel.clone();
                let tally = Arc::clone(&tally);
                async move { tally.add(random_path_call(channel, index).await) }
            },
        )
    };
    let enroll_flood = {
        let tally = Arc::clone(&enrollments);
        flood(arguments.enroll_flood, arguments.concurrency, move |_| {
            let client = enroll_client.clone();
            let tally = Arc::clone(&tally);
            async move { tally.add(bad_enrollment_call(client).await) }
        })
    };
    tokio::join!(random_paths, enroll_flood);
    let flood_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(arguments.hold.saturating_sub(started.elapsed())).await;
    let (resident_during, _) = server_memory_kib(arguments.server_pid)?;
    stop_idle.cancel();
    let _ = idle_hold.await;
    stop_sampling.cancel();
    let (fewest_agents, mut latencies, admin_failures) = sampler.await.unwrap_or_default();
    let after = scrape()?;
    let agents_after = connected_gauge(&after).unwrap_or(0.0);
    let rpc_series = after
        .lines()
        .filter(|line| line.starts_with("flotte_rpc_requests_total{"))
        .count();
    let (resident_after, peak) = server_memory_kib(arguments.server_pid)?;

    latencies.sort_unstable();
    let percentile = |fraction: f64| {
        let index = ((latencies.len() as f64 * fraction).ceil() as usize).saturating_sub(1);
        latencies
            .get(index)
            .map_or(0.0, |latency| latency.as_secs_f64() * 1000.0)
    };
    println!("floods done in {flood_seconds:.1} s");
    println!(
        "random paths ({}): {}",
        arguments.random_paths,
        paths.render()
    );
    println!(
        "enroll flood ({}): {}",
        arguments.enroll_flood,
        enrollments.render()
    );
    println!(
        "idle connections ({} from {} source address(es)): {}",
        arguments.idle_connections,
        arguments.idle_sources,
        idle.render()
    );
    println!(
        "admin ListMachines during the run: {} calls, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {admin_failures} failed",
        latencies.len(),
        percentile(0.5),
        percentile(0.99),
        percentile(1.0)
    );
    println!(
        "server RSS: {:.1} MiB before, {:.1} MiB with the idle connections held, {:.1} MiB after, peak {:.1} MiB",
        resident_before as f64 / 1024.0,
        resident_during as f64 / 1024.0,
        resident_after as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!("flotte_rpc_requests_total series after the run: {rpc_series}");
    println!(
        "agents connected: {agents_before} before, fewest {} during, {agents_after} after: {} lost",
        if fewest_agents == f64::MAX {
            agents_before
        } else {
            fewest_agents
        },
        agents_before - agents_after
    );
    Ok(())
}

fn main() -> ExitCode {
    let arguments = EdgeLoadArguments::parse();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(EdgeLoadError::Runtime)
        .and_then(|runtime| runtime.block_on(measure(arguments)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flotte-edge-load: {error}");
            ExitCode::FAILURE
        }
    }
}
