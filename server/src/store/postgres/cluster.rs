//! Test-only: one throwaway PostgreSQL cluster per test binary, shared by
//! the tests, each of which gets a fresh database of its own.
//!
//! The cluster is started by the tests themselves (never a system service):
//! `initdb` and `pg_ctl` run as the `postgres` user (`initdb` refuses root)
//! through `runuser`, in a temporary directory that user owns, trusting
//! local connections, on a free port of 127.0.0.1 with its socket inside
//! the data directory. A small shell keeper owns it: it stops the cluster
//! and removes the directory when its standard input closes, which happens
//! when the test process ends however it ends (a panic, a signal, a kill),
//! since a `static` is never dropped.
//!
//! Missing PostgreSQL binaries or a non-root test run fail the tests with
//! a message saying what is missing, unless `FLOTTE_TEST_SKIP_POSTGRES=1`
//! asks to skip them.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use tokio_postgres::NoTls;
use uuid::Uuid;

/// The environment variable that turns a missing PostgreSQL into skipped tests.
const SKIP_VARIABLE: &str = "FLOTTE_TEST_SKIP_POSTGRES";

/// The one role that must authenticate with a password (every other
/// connection is trusted); [`password_role_url`] creates it.
pub(super) const PASSWORD_ROLE: &str = "flotte_password_test";

/// Where Debian's `postgresql` package puts the server binaries, per version.
const DEBIAN_POSTGRESQL_DIRECTORY: &str = "/usr/lib/postgresql";

/// The keeper, run as `postgres` with `$1` = binaries directory, `$2` =
/// port, `$3` = [`PASSWORD_ROLE`], `$4` = more server options, `$5` = a
/// network to trust besides loopback (or nothing): creates the
/// cluster, starts it, says `ready DIR`, then waits for its standard input
/// to close and removes everything.
const KEEPER_SCRIPT: &str = r#"set -eu
bin=$1
port=$2
password_role=$3
more_options=$4
trusted_network=$5
dir=$(mktemp -d /tmp/flotte-postgres-test.XXXXXX)
cleanup() {
    "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM
if ! "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >"$dir/initdb.log" 2>&1; then
    cat "$dir/initdb.log" >&2
    exit 1
fi
# One role must give a password over TCP (the first matching line wins),
# so that sending the password kept apart from the URL is tested for real.
{ echo "host all $password_role 127.0.0.1/32 scram-sha-256"
  if [ -n "$trusted_network" ]; then echo "host all all $trusted_network trust"; fi
  cat "$dir/data/pg_hba.conf"; } \
    >"$dir/pg_hba.conf" && mv "$dir/pg_hba.conf" "$dir/data/pg_hba.conf"
if ! "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $dir/data -c fsync=off -c max_connections=300 $more_options" \
    start >/dev/null; then
    cat "$dir/server.log" >&2
    exit 1
fi
echo "ready $dir"
cat >/dev/null
"#;

/// A running cluster. The shared one is never dropped (see the module
/// comment); a private one ([`private_cluster`]) stops when dropped.
// The restart parts are used by `tests/tests/replicas.rs`, which includes
// this file; the store's own tests use the shared cluster only.
#[allow(dead_code)]
pub(super) struct Cluster {
    port: u16,
    /// The keeper's directory (`data/` inside), for restarts.
    directory: PathBuf,
    binaries: PathBuf,
    /// Held open for the life of the process: its closing stops the keeper.
    _keeper_input: Mutex<ChildStdin>,
    _keeper: Mutex<Child>,
}

/// The newest `bin` directory under [`DEBIAN_POSTGRESQL_DIRECTORY`] that has `initdb`.
fn postgres_binaries() -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(DEBIAN_POSTGRESQL_DIRECTORY).map_err(|error| {
        format!("no PostgreSQL server binaries ({DEBIAN_POSTGRESQL_DIRECTORY}: {error}); install Debian's `postgresql` package")
    })?;
    let mut versions: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        format!("no initdb under {DEBIAN_POSTGRESQL_DIRECTORY}/*/bin; install Debian's `postgresql` package")
    })
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|error| format!("find a free port: {error}"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| format!("find a free port: {error}"))
}

fn start_cluster() -> Result<Cluster, String> {
    start_cluster_with("", "")
}

/// A cluster started with `more_options` on the server's command line
/// (`-c name=value …`), trusting `trusted_network` (CIDR) besides loopback.
fn start_cluster_with(more_options: &str, trusted_network: &str) -> Result<Cluster, String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("the PostgreSQL tests start their own cluster as the `postgres` user through runuser, which needs root".into());
    }
    let binaries = postgres_binaries()?;
    let port = free_port()?;
    let mut keeper = Command::new("runuser")
        .args(["-u", "postgres", "--", "sh", "-c", KEEPER_SCRIPT, "keeper"])
        .arg(&binaries)
        .arg(port.to_string())
        .arg(PASSWORD_ROLE)
        .arg(more_options)
        .arg(trusted_network)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("run `runuser -u postgres` to start PostgreSQL: {error}"))?;
    let (Some(input), Some(output)) = (keeper.stdin.take(), keeper.stdout.take()) else {
        return Err("the keeper's pipes are missing".into());
    };
    let mut first_line = String::new();
    let read = BufReader::new(output).read_line(&mut first_line);
    let directory = first_line.trim().strip_prefix("ready ").map(PathBuf::from);
    let (Ok(_), Some(directory)) = (read, directory) else {
        let mut errors = String::new();
        if let Some(mut stderr) = keeper.stderr.take() {
            let _ = stderr.read_to_string(&mut errors);
        }
        let _ = keeper.wait();
        return Err(format!(
            "the throwaway PostgreSQL cluster did not start: {}",
            errors.trim()
        ));
    };
    Ok(Cluster {
        port,
        directory,
        binaries,
        _keeper_input: Mutex::new(input),
        _keeper: Mutex::new(keeper),
    })
}

// See the note on `Cluster`.
#[allow(dead_code)]
impl Cluster {
    /// A new, empty database's URL, for the trusted superuser.
    pub(super) async fn fresh_database_url(&self) -> String {
        self.fresh_database_url_at("127.0.0.1").await
    }

    /// A new, empty database's URL at `host` (an address it listens on).
    pub(super) async fn fresh_database_url_at(&self, host: &str) -> String {
        let database = fresh_database(self.port).await;
        format!("postgres://postgres@{host}:{}/{database}", self.port)
    }

    /// Runs `pg_ctl -D DATA ARGS…` as `postgres`, waiting for it.
    fn pg_ctl(&self, args: &[&str]) {
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.binaries.join("pg_ctl"))
            .arg("-D")
            .arg(self.directory.join("data"))
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(status.success(), "pg_ctl {args:?} failed");
    }

    /// Restarts the server (`pg_ctl restart -m fast`): every connection is
    /// cut, and the server accepts new ones when this returns.
    pub(super) fn restart(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "restart"]);
    }

    /// Stops the server (`pg_ctl stop -m fast`): connections are cut and
    /// new ones refused until [`Cluster::start_again`].
    pub(super) fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "stop"]);
    }

    /// Starts a stopped server again with the options it first had (pg_ctl
    /// restart of a stopped server reads them from `postmaster.opts`).
    pub(super) fn start_again(&self) {
        self.pg_ctl(&["-w", "-t", "60", "restart"]);
    }
}

/// A cluster of the caller's own (stopped and removed when dropped), for a
/// test that restarts it; `None` when skipped (see [`cluster_address`]).
// See the note on `Cluster`.
#[allow(dead_code)]
pub(super) fn private_cluster() -> Option<Cluster> {
    match start_cluster() {
        Ok(cluster) => Some(cluster),
        Err(reason) => skip_or_fail(&reason),
    }
}

/// A private cluster that also listens on `address` and trusts
/// `trusted_network` (CIDR): the operator address of a network lab and
/// the lab's hosts (`tests/src/netns.rs`); `None` when skipped.
// See the note on `Cluster`.
#[allow(dead_code)]
pub(super) fn private_cluster_on(address: &str, trusted_network: &str) -> Option<Cluster> {
    let options = format!("-c listen_addresses=127.0.0.1,{address}");
    match start_cluster_with(&options, trusted_network) {
        Ok(cluster) => Some(cluster),
        Err(reason) => skip_or_fail(&reason),
    }
}

/// A private cluster that accepts TLS with the certificate and key in
/// `directory` (`server.pem`, `server.key`, made readable to `postgres`
/// here); `None` when skipped (see [`cluster_address`]).
pub(super) fn private_cluster_with_tls(directory: &std::path::Path) -> Option<Cluster> {
    let postgres = match nix::unistd::User::from_name("postgres") {
        Ok(Some(user)) => user,
        _ => {
            return skip_or_fail(
                "there is no `postgres` user (install Debian's `postgresql` package)",
            )
        }
    };
    // PostgreSQL refuses a key that others can read or that it does not own.
    let key = directory.join("server.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("restrict the TLS key");
    nix::unistd::chown(&key, Some(postgres.uid), Some(postgres.gid))
        .expect("give the TLS key to postgres");
    std::fs::set_permissions(
        directory,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("open the TLS directory to postgres");
    let options = format!(
        "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
        directory.join("server.pem").display(),
        key.display()
    );
    match start_cluster_with(&options, "") {
        Ok(cluster) => Some(cluster),
        Err(reason) => skip_or_fail(&reason),
    }
}

/// `None` if [`SKIP_VARIABLE`] asks to skip; panics with `reason` otherwise.
fn skip_or_fail<T>(reason: &str) -> Option<T> {
    if std::env::var(SKIP_VARIABLE).as_deref() == Ok("1") {
        eprintln!("skipped ({SKIP_VARIABLE}=1): {reason}");
        None
    } else {
        panic!("{reason} (set {SKIP_VARIABLE}=1 to skip the PostgreSQL tests)")
    }
}

fn cluster() -> &'static Result<Cluster, String> {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    CLUSTER.get_or_init(start_cluster)
}

/// The shared cluster's address (`postgres://postgres@127.0.0.1:PORT`);
/// `None` if PostgreSQL is unavailable and [`SKIP_VARIABLE`] asks to skip.
/// Panics with the reason if it is unavailable otherwise.
async fn cluster_address() -> Option<u16> {
    let cluster = tokio::task::spawn_blocking(cluster)
        .await
        .expect("the cluster start-up task");
    match cluster {
        Ok(cluster) => Some(cluster.port),
        Err(reason) => skip_or_fail(reason),
    }
}

/// Runs `sql` as the superuser on the cluster listening on `port`.
async fn run_as_superuser(port: u16, sql: &str) {
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .expect("connect to the throwaway cluster");
    let connection = tokio::spawn(connection);
    client
        .batch_execute(sql)
        .await
        .expect("run a statement on the throwaway cluster");
    drop(client);
    let _ = connection.await;
}

/// A new, empty database in the shared cluster; its name.
async fn fresh_database(port: u16) -> String {
    let database = format!("flotte_test_{}", Uuid::new_v4().simple());
    run_as_superuser(port, &format!("CREATE DATABASE {database}")).await;
    database
}

/// The URL of a new, empty database in the shared cluster, for the
/// trusted superuser; `None` when skipped (see [`cluster_address`]).
pub(super) async fn fresh_database_url() -> Option<String> {
    let port = cluster_address().await?;
    let database = fresh_database(port).await;
    Some(format!("postgres://postgres@127.0.0.1:{port}/{database}"))
}

/// The URL (without password) of a new database owned by
/// [`PASSWORD_ROLE`], which must log in with `password`; `None` when
/// skipped (see [`cluster_address`]).
pub(super) async fn password_role_url(password: &str) -> Option<String> {
    let port = cluster_address().await?;
    let database = fresh_database(port).await;
    // The role is shared by the tests of this binary: create it once, set
    // the password each time (callers use the same one).
    run_as_superuser(
        port,
        &format!(
            "DO $$ BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{PASSWORD_ROLE}') THEN
                    CREATE ROLE {PASSWORD_ROLE} LOGIN;
                END IF;
             END $$;
             ALTER ROLE {PASSWORD_ROLE} PASSWORD '{password}';
             ALTER DATABASE {database} OWNER TO {PASSWORD_ROLE};"
        ),
    )
    .await;
    Some(format!(
        "postgres://{PASSWORD_ROLE}@127.0.0.1:{port}/{database}"
    ))
}
