//! `flotte-server`: `init` a data dir, or `run` the server. Thin: parsing and
//! exit codes only; the work is in the `flotte_server` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flotte_proto::data_dir_lock::{describe_io_error, lock_data_dir};
use flotte_server::config::{
    default_config_path, read_toml, ServerConfigFile, StoreConfigFile, StoreKind,
};
use flotte_server::init::{init, init_replica, InitOptions, ReplicaOptions};
use tokio_util::sync::CancellationToken;

/// jemalloc serves every allocation of the process, Rust's and C's (the
/// bundled SQLite's), with Rust's 16 KiB blocks in an arena of their own:
/// see `flotte_server::allocator` for why.
#[global_allocator]
static ALLOCATOR: flotte_server::allocator::ServerAllocator =
    flotte_server::allocator::ServerAllocator;

/// The settings jemalloc reads at its first allocation, before `main`: it
/// looks for a `const char *malloc_conf` in the program (its own is a weak
/// empty one). `MALLOC_CONF` in the environment is read after, and wins.
#[used]
#[allow(unsafe_code, non_upper_case_globals)]
// SAFETY: jemalloc reads this symbol as a `const char *` to a NUL-terminated
// string, once, and never writes through it. A `&'static u8` has the layout
// of a non-null `const char *`, and it points at the first byte of a
// `'static` C string literal, which ends with its NUL and is never written.
#[export_name = "malloc_conf"]
static malloc_conf: &u8 = &flotte_server::allocator::JEMALLOC_SETTINGS.to_bytes_with_nul()[0];

#[derive(Debug, Parser)]
#[command(name = "flotte-server", version, about = "Flotte fleet server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum ReplicaCommand {
    /// Prepare a new replica's data dir from the first one's: the CA, the
    /// settings (with this replica's name, listen address and zone) and the
    /// database password file; never the admin profile. Copy the new data
    /// dir to the replica's host (it holds the CA key: keep it private).
    Init {
        /// The data dir of an existing replica (made by `init --store-url`).
        #[arg(long)]
        from: PathBuf,
        /// The new replica's data dir (must not exist).
        #[arg(long)]
        data_dir: PathBuf,
        /// The replica's own name: its certificate says `server/<name>`.
        #[arg(long)]
        name: String,
        /// Its gRPC listen address, e.g. 0.0.0.0:7443.
        #[arg(long)]
        listen: String,
        /// The zone (datacenter) it runs in, shown by `flottectl status`.
        #[arg(long)]
        zone: Option<String>,
        /// host:port agents and operators reach it on, if not --listen.
        #[arg(long)]
        advertise_address: Option<String>,
        /// A DNS name or IP address for this replica's certificate
        /// (repeatable); default: the host of --advertise-address or
        /// --listen, unless a wildcard.
        #[arg(long = "san")]
        subject_alt_names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a data dir: CA, server settings and the admin operator profile.
    Init {
        /// The data dir to create (it must not hold a CA yet).
        #[arg(long)]
        data_dir: PathBuf,
        /// gRPC listen address written to the settings (default 127.0.0.1:7443).
        #[arg(long)]
        listen: Option<String>,
        /// Extra DNS name or IP address for the server certificate (repeatable).
        #[arg(long = "san")]
        subject_alt_names: Vec<String>,
        /// The name in every identity, `spiffe://DOMAIN/…` (default
        /// flotte.local).
        #[arg(long)]
        trust_domain: Option<String>,
        /// Keep the state in this PostgreSQL database
        /// (`postgres://user@host:port/database`, no password) instead of
        /// SQLite in the data dir; written to `[store]` in the settings.
        #[arg(long)]
        store_url: Option<String>,
        /// File holding the PostgreSQL password (with --store-url; a relative
        /// path is taken from the data dir).
        #[arg(long, requires = "store_url")]
        store_password_file: Option<PathBuf>,
        /// Connect to PostgreSQL over TLS, trusting the CA certificates in
        /// this PEM file (with --store-url; relative to the data dir).
        #[arg(long, requires = "store_url")]
        store_tls_ca_file: Option<PathBuf>,
        /// The server's own name (default flotte-server); with several
        /// replicas, this first one's name.
        #[arg(long)]
        name: Option<String>,
        /// The zone (datacenter) it runs in, shown by `flottectl status`.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Several replicas of the server sharing one PostgreSQL database.
    Replica {
        #[command(subcommand)]
        command: ReplicaCommand,
    },
    /// Serve the gRPC API over mutual TLS.
    Run {
        /// Log lines as `text` (for people) or `json` (one object per line,
        /// fields in docs/logs.md).
        #[arg(long, default_value = "text")]
        log_format: flotte_proto::logging::LogFormat,
        /// The data dir `init` (or `replica init`) made.
        #[arg(long)]
        data_dir: PathBuf,
        /// Settings file (default: <data-dir>/server.toml if it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `listen` from the settings.
        #[arg(long)]
        listen: Option<String>,
        /// Overrides `machine_certificate_ttl` (e.g. "24h", "5s").
        #[arg(long)]
        machine_certificate_ttl: Option<String>,
        /// Overrides `report_interval`.
        #[arg(long)]
        report_interval: Option<String>,
        /// Overrides `metrics_listen` (Prometheus /metrics address).
        #[arg(long)]
        metrics_listen: Option<String>,
    },
    /// Write a consistent backup of a data dir (store, CA, settings, admin
    /// profile, image blobs, forensic bundles) while the server runs.
    Backup {
        /// The server's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// Archive to write (mode 0600, encrypted: it holds the CA key).
        #[arg(long)]
        out: PathBuf,
        /// Who can restore it: an age public key (`age1…`) or a file of
        /// them, one per line; repeatable (`backup-key` makes a pair).
        #[arg(long = "recipient", required = true)]
        recipients: Vec<String>,
    },
    /// Mint a new admin profile from the data dir's CA key (recovery, when
    /// every admin's certificate is lost or expired): an existing admin gets
    /// a new certificate, an unknown name is created as an admin; audited.
    /// Run it on the server host; the server may be running.
    AdminProfile {
        /// The server's data dir (its CA key signs the new certificate).
        #[arg(long)]
        data_dir: PathBuf,
        /// Profile directory to write (must not hold a profile yet).
        #[arg(long)]
        out: PathBuf,
        /// The admin's name (default: admin, the one `init` made).
        #[arg(long, default_value = flotte_server::init::FIRST_ADMIN)]
        name: String,
    },
    /// Rebuild a data dir from a backup; the target must be missing or empty.
    Restore {
        /// The backup archive `backup` wrote.
        #[arg(long)]
        from: PathBuf,
        /// The age identity file (`AGE-SECRET-KEY-1…`) of a recipient.
        #[arg(long)]
        identity: PathBuf,
        /// The data dir to rebuild (missing or empty).
        #[arg(long)]
        data_dir: PathBuf,
        /// For a backup of a data dir whose state is in PostgreSQL: the
        /// empty database to restore it into (`postgres://user@host:port/db`,
        /// no password); the restored settings point there.
        #[arg(long)]
        store_url: Option<String>,
        /// File holding that database's password (kept in the settings).
        #[arg(long, requires = "store_url")]
        store_password_file: Option<PathBuf>,
    },
    /// Make a backup key pair: writes the identity (secret, 0600, keep it
    /// off the server) and prints the recipient to give to `backup`.
    BackupKey {
        /// The identity file to write (secret: keep it off the server).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs `work` on a one-thread runtime (the PostgreSQL driver needs the I/O
/// and time drivers), with its error as text.
fn block_on_one_thread<T, E: std::fmt::Display>(
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))?
        .block_on(work)
        .map_err(|error| error.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::BackupKey { out } => match flotte_server::backup::generate_backup_key(&out) {
            Ok(recipient) => {
                println!("{recipient}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("flotte-server backup-key: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Backup {
            data_dir,
            out,
            recipients,
        } => {
            let now = flotte_server::clock::Clock::now_unix(&flotte_server::clock::SystemClock);
            let outcome = flotte_server::backup::recipients(&recipients).and_then(|recipients| {
                flotte_server::backup::backup(&data_dir, &out, &recipients, now)
            });
            match outcome {
                Ok(summary) => {
                    let bytes: u64 = summary.manifest.files.iter().map(|file| file.size).sum();
                    println!(
                        "backed up {} ({} files, {bytes} bytes) to {}",
                        data_dir.display(),
                        summary.manifest.files.len(),
                        summary.archive.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("flotte-server backup: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::AdminProfile {
            data_dir,
            out,
            name,
        } => match block_on_one_thread(flotte_server::recovery::mint_admin_profile(
            &data_dir, &out, &name,
        )) {
            Ok(minted) => {
                let what = if minted.created {
                    "created as a new admin"
                } else {
                    "given a new certificate"
                };
                println!(
                    "operator {} {what} (serial {}); profile written to {}",
                    minted.name,
                    minted.certificate_serial,
                    minted.profile.display()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("flotte-server admin-profile: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Restore {
            from,
            identity,
            data_dir,
            store_url,
            store_password_file,
        } => match flotte_server::backup::restore(
            &from,
            &identity,
            &data_dir,
            store_url
                .map(|url| flotte_server::backup::RestoreDatabase {
                    url,
                    password_file: store_password_file,
                })
                .as_ref(),
        ) {
            Ok(summary) => {
                println!(
                        "restored {} files into {}; decrypted and authenticated, every checksum and the store's integrity verified (the admin key is not in backups: use your own admin profile)",
                        summary.manifest.files.len(),
                        summary.data_dir.display()
                    );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("flotte-server restore: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Replica {
            command:
                ReplicaCommand::Init {
                    from,
                    data_dir,
                    name,
                    listen,
                    zone,
                    advertise_address,
                    subject_alt_names,
                },
        } => match init_replica(
            &from,
            &data_dir,
            ReplicaOptions {
                name,
                listen,
                zone,
                advertise_address,
                subject_alt_names,
            },
        ) {
            Ok(config_path) => {
                println!("prepared replica data dir {}", data_dir.display());
                println!("  settings: {}", config_path.display());
                println!(
                    "  start it: flotte-server run --data-dir {}",
                    data_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("flotte-server replica init: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Init {
            data_dir,
            listen,
            subject_alt_names,
            trust_domain,
            store_url,
            store_password_file,
            store_tls_ca_file,
            name,
            zone,
        } => match block_on_one_thread(init(
            &data_dir,
            InitOptions {
                listen,
                subject_alt_names,
                trust_domain,
                store: StoreConfigFile {
                    kind: if store_url.is_some() {
                        StoreKind::Postgres
                    } else {
                        StoreKind::Sqlite
                    },
                    url: store_url,
                    password_file: store_password_file,
                    tls_ca_file: store_tls_ca_file,
                },
                server_name: name,
                zone,
            },
        )) {
            Ok(summary) => {
                println!("initialised {}", data_dir.display());
                println!("  settings:       {}", summary.config_path.display());
                println!("  admin profile:  {}", summary.admin_profile.display());
                println!("  CA fingerprint: sha256:{}", summary.ca_fingerprint);
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("flotte-server init: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            log_format,
            data_dir,
            config,
            listen,
            machine_certificate_ttl,
            report_interval,
            metrics_listen,
        } => {
            flotte_proto::logging::init_logging(log_format);
            // One socket per connected agent: the default soft limit (often
            // 1 024) would cap the fleet long before memory or CPU does. A
            // failure is not fatal; the server still serves up to the old limit.
            match flotte_server::limits::raise_open_files_limit() {
                Ok(limit) => tracing::info!(
                    soft = limit.soft,
                    hard = limit.hard,
                    previous_soft = limit.previous_soft,
                    "open-files limit (bounds the number of connected agents)"
                ),
                Err(error) => tracing::warn!(%error, "open-files limit left as it was"),
            }
            // Not fatal either: without it, the server runs as it did with
            // jemalloc alone, its resident size creeping as sessions churn.
            let fresh_page_arena = flotte_server::allocator::set_up_fresh_page_arena()
                .inspect_err(|error| tracing::warn!(%error, "16 KiB blocks share the other arenas"))
                .ok();
            tracing::info!(
                allocator = "jemalloc",
                settings = flotte_server::allocator::built_in_settings(),
                operator_settings =
                    std::env::var(flotte_server::allocator::OPERATOR_SETTINGS_VARIABLE).ok(),
                fresh_page_arena,
                "memory allocator (its settings bound the resident size's drift)"
            );
            let config_path = config.unwrap_or_else(|| default_config_path(&data_dir));
            // `try_exists`, not `exists`: a data dir this user cannot read
            // must be said as such, never taken for one without settings.
            let config_exists = match config_path.try_exists() {
                Ok(exists) => exists,
                Err(error) => {
                    eprintln!("flotte-server: {}", describe_io_error(&config_path, &error));
                    return ExitCode::from(2);
                }
            };
            let mut settings = if config_exists {
                match read_toml::<ServerConfigFile>(&config_path) {
                    Ok(settings) => settings,
                    Err(error) => {
                        eprintln!("flotte-server: {error}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                ServerConfigFile::default()
            };
            if let Some(listen) = listen {
                settings.listen = listen;
            }
            if let Some(ttl) = machine_certificate_ttl {
                settings.machine_certificate_ttl = ttl;
            }
            if let Some(interval) = report_interval {
                settings.report_interval = interval;
            }
            if metrics_listen.is_some() {
                settings.metrics_listen = metrics_listen;
            }
            let config = match settings.validate(data_dir.clone()) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("flotte-server: {error}");
                    return ExitCode::from(2);
                }
            };
            // After the settings, so that a bad config is reported in full
            // even where the data dir is not initialised yet.
            let ca_path = flotte_server::ca::ca_certificate_path(&data_dir);
            match ca_path.try_exists() {
                Ok(true) => {}
                Ok(false) => {
                    eprintln!(
                        "flotte-server: no CA at {}: run `flotte-server init --data-dir {}` first",
                        ca_path.display(),
                        data_dir.display()
                    );
                    return ExitCode::from(2);
                }
                Err(error) => {
                    eprintln!("flotte-server: {}", describe_io_error(&ca_path, &error));
                    return ExitCode::from(2);
                }
            }
            // Held until the process ends: one server per data dir.
            let _data_dir_lock = match lock_data_dir(&data_dir, "flotte-server") {
                Ok(lock) => lock,
                Err(error) => {
                    eprintln!("flotte-server: {error}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("flotte-server: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(config.listen).await {
                    Ok(listener) => listener,
                    Err(error) => {
                        eprintln!("flotte-server: cannot listen on {}: {error}", config.listen);
                        return ExitCode::FAILURE;
                    }
                };
                let bound = match listener.local_addr() {
                    Ok(address) => address,
                    Err(error) => {
                        eprintln!("flotte-server: {error}");
                        return ExitCode::FAILURE;
                    }
                };
                // Scripts and tests started on port 0 read the real address here.
                let address_file = data_dir.join("server.address");
                if let Err(error) = flotte_proto::files::write_atomically(
                    &address_file,
                    format!("{bound}\n").as_bytes(),
                ) {
                    eprintln!(
                        "flotte-server: cannot write {}: {error}",
                        address_file.display()
                    );
                    return ExitCode::FAILURE;
                }
                tracing::info!(address = %bound, "listening");
                let shutdown = CancellationToken::new();
                let signal_shutdown = shutdown.clone();
                tokio::spawn(async move {
                    flotte_proto::signals::wait_for_termination().await;
                    tracing::info!("shutting down");
                    signal_shutdown.cancel();
                });
                match flotte_server::run(config, listener, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("flotte-server: {error}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_command_and_argument_is_described_in_help() {
        flotte_proto::cli_help::assert_every_argument_described(&Cli::command());
    }
}
