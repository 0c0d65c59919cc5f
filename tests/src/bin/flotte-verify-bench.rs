//! `flotte-verify-bench`: how fast the agent's image verification reads a
//! large tree, unthrottled against `sha256sum -c` of the same files, and
//! throttled against the rate it was given; and how much memory it takes.
//!
//! It writes SIZE MiB of incompressible files as an unpacked image under an
//! agent layout, indexes it (what the agent does at unpack), then runs the
//! agent's own `verify_tree` — the code a verification runs on the blocking
//! pool — unthrottled and at each `--rate-mb`. The baseline is `sha256sum -c`
//! over a checksum list of the same files. Every run reads from the page
//! cache (the tree was just written and fits in memory), so the figures
//! compare hashing and walking, not the disk. A thread samples this
//! process's VmRSS every 5 ms during each verification: the growth over the
//! idle figure is what the verification itself costs in memory.
//!
//! Run with `cargo run --release -p flotte-tests --bin flotte-verify-bench`;
//! BENCHMARKS.md has the figures and the machine they were taken on.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flotte_agent::image::integrity::{index_fresh_tree, verify_tree, VerifyOutcome};
use flotte_agent::image::layout::{ImageLayout, LocalImage};
use flotte_tests::sample_fleet::write_incompressible_tree;
use flotte_tests::TempDir;

#[derive(Debug, Parser)]
#[command(
    name = "flotte-verify-bench",
    about = "Time the agent's image verification against sha256sum -c of the same tree"
)]
struct Cli {
    /// Size of the tree, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Files the tree is split into.
    #[arg(long, default_value_t = 64)]
    files: u64,
    /// Throttled runs, in MB/s (10^6 bytes), each over the whole tree.
    #[arg(long, value_delimiter = ',', default_value = "100,20")]
    rate_mb: Vec<u64>,
    /// Keep everything under DIR (new or empty) instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// VmRSS of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `work` while sampling VmRSS; its result, the time it took and the
/// peak VmRSS seen.
fn measured<T>(work: impl FnOnce() -> T) -> (T, Duration, u64) {
    let running = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(rss_kib()));
    let sampler = {
        let running = Arc::clone(&running);
        let peak = Arc::clone(&peak);
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let started = Instant::now();
    let result = work();
    let took = started.elapsed();
    running.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    (result, took, peak.load(Ordering::Relaxed))
}

fn mb_per_second(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// `sha256sum -c` of every file of `tree`; the time it took.
fn sha256sum_check(tree: &Path, files: u64) -> Result<Duration, String> {
    let names: Vec<String> = (0..files)
        .map(|index| format!("data/blob-{index:04}.bin"))
        .collect();
    let listed = Command::new("sha256sum")
        .current_dir(tree)
        .args(&names)
        .output()
        .map_err(|error| format!("sha256sum: {error}"))?;
    let list = tree.join("../sums.txt");
    std::fs::write(&list, &listed.stdout).map_err(|error| error.to_string())?;
    let started = Instant::now();
    let checked = Command::new("sha256sum")
        .current_dir(tree)
        .arg("--quiet")
        .arg("-c")
        .arg(&list)
        .status()
        .map_err(|error| format!("sha256sum -c: {error}"))?;
    let took = started.elapsed();
    if !checked.success() {
        return Err("sha256sum -c found a difference".to_owned());
    }
    Ok(took)
}

fn run(cli: &Cli) -> Result<(), String> {
    let temporary;
    let root = match &cli.dir {
        Some(dir) => dir.clone(),
        None => {
            temporary = TempDir::new("flotte-verify-bench").map_err(|error| error.to_string())?;
            temporary.path().to_owned()
        }
    };
    let layout = ImageLayout::new(&root);
    let image = LocalImage {
        name: "bench".into(),
        version: "1.0.0".into(),
        digest: "b".repeat(64),
    };
    let tree = layout.image_dir(&image.digest);
    let total = cli.size_mib * 1024 * 1024;
    println!(
        "writing {} MiB in {} files under {}",
        cli.size_mib,
        cli.files,
        tree.display()
    );
    write_incompressible_tree(&tree.join("data"), total, cli.files)?;
    let (indexed, index_took, _) =
        measured(|| index_fresh_tree(&tree, &[], &layout.index_path(&image.digest)));
    indexed.map_err(|error| error.to_string())?;
    println!(
        "index at unpack: {:.2} s ({:.0} MB/s)",
        index_took.as_secs_f64(),
        mb_per_second(total, index_took)
    );
    let idle_rss = rss_kib();
    let baseline = sha256sum_check(&tree, cli.files)?;
    println!(
        "sha256sum -c: {:.2} s ({:.0} MB/s)",
        baseline.as_secs_f64(),
        mb_per_second(total, baseline)
    );
    for rate in std::iter::once(0).chain(cli.rate_mb.iter().copied()) {
        let (verification, took, peak) =
            measured(|| verify_tree(&layout, &image, rate * 1_000_000, String::new()));
        if verification.outcome != VerifyOutcome::Clean {
            return Err(format!("verification: {:?}", verification.outcome));
        }
        let throughput = mb_per_second(verification.bytes_read, took);
        let setting = if rate == 0 {
            format!(
                "unthrottled, {:.2}× sha256sum -c",
                took.as_secs_f64() / baseline.as_secs_f64()
            )
        } else {
            format!(
                "limit {rate} MB/s, {:+.1} % off",
                (throughput / rate as f64 - 1.0) * 100.0
            )
        };
        println!(
            "verify: {:.2} s, {} bytes, {:.1} MB/s ({setting}); RSS idle {} KiB, peak {} KiB (+{} KiB)",
            took.as_secs_f64(),
            verification.bytes_read,
            throughput,
            idle_rss,
            peak,
            peak.saturating_sub(idle_rss)
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flotte-verify-bench: {error}");
            ExitCode::FAILURE
        }
    }
}
