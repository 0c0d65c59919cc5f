//! `flotte-swap-bench`: how long a real agent takes to swap to a large image,
//! against the plain tools doing the same work on the same bytes.
//!
//! It starts a release server and agent on 127.0.0.1 (real mutual TLS),
//! builds a sample image whose payload is SIZE MiB of incompressible files
//! plus the sample HTTP service, and swaps the agent from a small v1 to it.
//! From the agent's own log (one line per journalled swap step) it takes
//! the time from the start of the download to the switch: fetch over mTLS,
//! SHA-256 verification, safe unpack and fsync. The baseline is `sha256sum`
//! then `tar --zstd -x` of the very same payload file, run here. A prober
//! hits the service every millisecond during the swap and reports the
//! longest stretch with no successful answer: the service's unavailability
//! window during the switch.
//!
//! Run with `cargo run --release -p flotte-tests --bin flotte-swap-bench`;
//! BENCHMARKS.md has the figures and the machine they were taken on.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flotte_tests::sample_fleet::{
    build_sample_image_on_port, free_port, write_incompressible_tree,
};
use flotte_tests::{http_get, wait_until, Agent, Server, TempDir};

#[derive(Debug, Parser)]
#[command(
    name = "flotte-swap-bench",
    about = "Time a real agent's swap to a large image against sha256sum + tar x of the same payload"
)]
struct Cli {
    /// Size of the incompressible part of the payload, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Files the incompressible part is split into.
    #[arg(long, default_value_t = 64)]
    files: u64,
    /// Keep everything under DIR (new or empty) instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

const SWAP_TIMEOUT: Duration = Duration::from_secs(900);
const PROBE_INTERVAL: Duration = Duration::from_millis(1);

fn ctl(server: &Server, args: &[&str]) -> Result<String, String> {
    let output = server.ctl(args);
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "flottectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Builds and pushes `app@version`: the sample service on `port`, plus
/// `extra` = (bytes, files) of incompressible data.
fn build_image(
    root: &Path,
    server: &Server,
    version: &str,
    port: u16,
    extra: Option<(u64, u64)>,
) -> Result<PathBuf, String> {
    if let Some((bytes, files)) = extra {
        write_incompressible_tree(&root.join(format!("tree-{version}/data")), bytes, files)?;
    }
    let out = build_sample_image_on_port(server, root, &root.join("keys"), version, port, "");
    ctl(server, &["image", "push", &out.to_string_lossy()])?;
    // The unpacked tree is not needed any more; the disk may be small.
    let _ = std::fs::remove_dir_all(root.join(format!("tree-{version}")));
    Ok(out)
}

/// Sets `app@version` on the agent and waits until it is committed.
fn swap_to(server: &Server, agent: &Agent, version: &str) -> Result<(), String> {
    let wanted = format!("app@{version}");
    ctl(server, &["machines", "set-image", "bench-1", &wanted])?;
    let committed = wait_until(SWAP_TIMEOUT, || {
        let machine = server.ctl_json(&["machines", "show", "bench-1"]);
        machine["current_image"] == wanted.as_str()
            && machine["last_swap"]["outcome"] == "committed"
    });
    if committed {
        Ok(())
    } else {
        Err(format!("{wanted} was not committed:\n{}", agent.log()))
    }
}

/// Time of the agent's log line for swap step `step` of `image`.
fn step_time(log: &str, image: &str, step: &str) -> Result<humantime::Timestamp, String> {
    log.lines()
        .rev()
        .find(|line| {
            line.contains("swap step")
                && line.contains(&format!("image={image}"))
                && line.contains(&format!("step=\"{step}\""))
        })
        .and_then(|line| line.split_whitespace().next())
        .and_then(|stamp| stamp.parse::<humantime::Timestamp>().ok())
        .ok_or_else(|| format!("no `swap step` line for {step} of {image} in the agent log"))
}

fn between(log: &str, image: &str, from: &str, to: &str) -> Result<Duration, String> {
    let start = std::time::SystemTime::from(step_time(log, image, from)?);
    let end = std::time::SystemTime::from(step_time(log, image, to)?);
    end.duration_since(start)
        .map_err(|_| format!("{to} logged before {from}"))
}

/// What the prober saw.
#[derive(Debug, Default)]
struct Probes {
    answered: u64,
    failed: u64,
    /// The longest stretch between two successful answers that had
    /// failures in it.
    longest_gap: Duration,
}

/// Probes `address` every millisecond until `stop`.
fn probe_until_stopped(address: String, stop: Arc<AtomicBool>) -> Probes {
    let mut probes = Probes::default();
    let mut last_success = Instant::now();
    let mut failing = false;
    while !stop.load(Ordering::SeqCst) {
        match http_get(&address, "/health") {
            Ok((200, _)) => {
                let now = Instant::now();
                if failing {
                    probes.longest_gap = probes.longest_gap.max(now - last_success);
                    failing = false;
                }
                last_success = now;
                probes.answered += 1;
            }
            _ => {
                failing = true;
                probes.failed += 1;
            }
        }
        std::thread::sleep(PROBE_INTERVAL);
    }
    probes
}

fn timed(program: &str, args: &[&str]) -> Result<Duration, String> {
    let started = Instant::now();
    let status = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|error| format!("{program}: {error}"))?;
    if !status.success() {
        return Err(format!("{program} {args:?} failed: {status}"));
    }
    Ok(started.elapsed())
}

fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

fn run(cli: &Cli) -> Result<(), String> {
    let temporary;
    let root = match &cli.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|error| error.to_string())?;
            dir.clone()
        }
        None => {
            temporary = TempDir::new("flotte-swap-bench").map_err(|error| error.to_string())?;
            temporary.path().to_owned()
        }
    };
    let mut server = Server::init(&root, "server", &[]).with_run_args(&["--report-interval", "1s"]);
    server.start();
    let keys = root.join("keys");
    let path_text = |path: &Path| path.to_string_lossy().into_owned();
    ctl(&server, &["image", "keygen", "--out", &path_text(&keys)])?;
    ctl(
        &server,
        &[
            "image",
            "trust",
            "add",
            &path_text(&keys.join("release.pub")),
        ],
    )?;
    let port = free_port().map_err(|error| format!("no free port: {error}"))?;
    println!(
        "building app@1.0.0 (small) and app@2.0.0 ({} MiB in {} files)…",
        cli.size_mib, cli.files
    );
    build_image(&root, &server, "1.0.0", port, None)?;
    let big = build_image(
        &root,
        &server,
        "2.0.0",
        port,
        Some((cli.size_mib << 20, cli.files)),
    )?;
    let token = server.token("role=bench", "dc1", &[]);
    let mut agent = Agent::new(&root, "bench-1", &server.address, &token).with_config(&format!(
        "[images]\nrelease_keys = [\"{}\"]\nverify_deadline = \"60s\"\nsoak = \"1s\"\n",
        keys.join("release.pub").display()
    ));
    agent.start();
    if !wait_until(Duration::from_secs(60), || server.connected_count() == 1) {
        return Err(format!("the agent did not connect:\n{}", agent.log()));
    }
    swap_to(&server, &agent, "1.0.0")?;

    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = Arc::clone(&stop);
        let address = format!("127.0.0.1:{port}");
        std::thread::spawn(move || probe_until_stopped(address, stop))
    };
    println!("swapping to app@2.0.0…");
    swap_to(&server, &agent, "2.0.0")?;
    stop.store(true, Ordering::SeqCst);
    let probes = prober
        .join()
        .map_err(|_| "the prober panicked".to_owned())?;
    if probes.answered == 0 {
        return Err(format!("the service never answered the prober: {probes:?}"));
    }
    let log = agent.log();
    let image = "app@2.0.0";
    let download = between(&log, image, "downloading", "verifying_payload")?;
    let unpack = between(&log, image, "unpacking", "switching")?;
    let agent_total = between(&log, image, "downloading", "switching")?;
    let switch_and_restart = between(&log, image, "switching", "verifying")?;

    // The baseline: the same payload bytes, checked and unpacked by the tools.
    let image_file =
        flotte_common::image_build::read_image_file(&big).map_err(|e| e.to_string())?;
    let payload_path = root.join("baseline-payload.tar.zst");
    {
        let mut payload = flotte_common::image_build::open_payload(&big, &image_file)
            .map_err(|error| error.to_string())?;
        let mut out = std::fs::File::create(&payload_path).map_err(|error| error.to_string())?;
        std::io::copy(&mut payload, &mut out).map_err(|error| error.to_string())?;
    }
    let extracted = root.join("baseline-tree");
    std::fs::create_dir_all(&extracted).map_err(|error| error.to_string())?;
    let sha256sum = timed("sha256sum", &[&path_text(&payload_path)])?;
    let tar = timed(
        "tar",
        &[
            "--zstd",
            "-xf",
            &path_text(&payload_path),
            "-C",
            &path_text(&extracted),
        ],
    )?;
    let baseline = sha256sum + tar;
    // coreutils' sha256sum may lack the CPU's SHA instructions, which the
    // agent (ring) uses: a second baseline hashes with OpenSSL, when present.
    let openssl = timed("openssl", &["dgst", "-sha256", &path_text(&payload_path)]).ok();

    println!();
    println!(
        "payload: {} bytes ({} MiB of incompressible files + the sample service)",
        image_file.payload_size, cli.size_mib
    );
    println!(
        "agent, download over mTLS with SHA-256: {}",
        seconds(download)
    );
    println!(
        "agent, safe unpack with fsync:          {}",
        seconds(unpack)
    );
    println!(
        "agent, download → switch (all of it):   {}",
        seconds(agent_total)
    );
    println!(
        "baseline, sha256sum:                     {}",
        seconds(sha256sum)
    );
    println!("baseline, tar --zstd -x:                 {}", seconds(tar));
    println!(
        "baseline, total:                         {}",
        seconds(baseline)
    );
    println!(
        "ratio agent / baseline:                  {:.2}",
        agent_total.as_secs_f64() / baseline.as_secs_f64()
    );
    if let Some(openssl) = openssl {
        println!(
            "baseline, openssl dgst -sha256:          {}",
            seconds(openssl)
        );
        println!(
            "ratio agent / (openssl + tar):           {:.2}",
            agent_total.as_secs_f64() / (openssl + tar).as_secs_f64()
        );
    }
    println!(
        "switch + restart of the service:         {:.0} ms",
        switch_and_restart.as_secs_f64() * 1000.0
    );
    println!(
        "service unavailable (longest gap):       {:.1} ms ({} probes answered, {} failed)",
        probes.longest_gap.as_secs_f64() * 1000.0,
        probes.answered,
        probes.failed
    );
    if let Some(process) = agent.process.as_mut() {
        process.terminate(Duration::from_secs(10));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flotte-swap-bench: {error}");
            ExitCode::FAILURE
        }
    }
}
