//! A small network lab for fault tests: hosts as network namespaces the test
//! makes itself, joined by one bridge, with helpers to cut a zone off, cut
//! one direction, lose packets, delay traffic, and heal.
//!
//! Layout: a hub namespace holds the bridge; each host is a namespace with
//! one `eth0` veth whose peer sits on the bridge; the test's own namespace
//! joins the bridge too, as the lab's operator address `10.N.0.254`, so
//! that processes the test starts directly (a server, PostgreSQL, flottectl)
//! are reachable from the hosts. Zone `z` is the subnet `10.N.z.0/24`
//! (everything is one `/16` on the bridge); `N` is chosen per lab among
//! ranges nothing on this machine uses, so the lab's traffic never leaves
//! its namespaces.
//!
//! Faults are nftables rules *inside* each host's namespace (this kernel has
//! no `tc netem`): a cut drops everything from and to outside the zone, a
//! one-way cut drops what arrives from one address, loss is a `numgen
//! random` drop. Latency is a [`DelayingForwarder`] in the test's process.
//! Packets are dropped, never refused: a cut looks like a real partition
//! (silence), not like a dead peer (resets).
//!
//! Everything is removed when the [`Lab`] is dropped, even after a panic;
//! namespaces a killed test run left behind are removed by the next lab.
//! The lab needs root, `ip` (iproute2) and `nft` (nftables): without them
//! [`Lab::start`] fails the test, unless `FLOTTE_TEST_SKIP_NETNS=1` asks
//! to skip.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The environment variable that turns a missing lab into a skipped test.
pub const SKIP_VARIABLE: &str = "FLOTTE_TEST_SKIP_NETNS";

/// Every namespace a lab makes starts with this, then the test's pid.
const NAMESPACE_PREFIX: &str = "flotte-lab-";

/// The operator address's last octet (zone 0).
const OPERATOR_HOST: u8 = 254;

static LABS_MADE: AtomicU32 = AtomicU32::new(0);

/// What went wrong building or changing the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the network lab needs root (network namespaces, nftables)")]
    NotRoot,
    #[error("`{command}` could not run: {error} (install iproute2 and nftables)")]
    Spawn {
        command: String,
        error: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("no free 10.N.0.0/16 range for a lab")]
    NoFreeRange,
}

/// One host: a network namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub namespace: String,
    pub zone: u8,
    pub address: Ipv4Addr,
}

/// A lab of hosts in zones; dropped, it removes every namespace it made.
#[derive(Debug)]
pub struct Lab {
    /// `flotte-lab-<pid>-<n>`, the prefix of every namespace of this lab.
    name: String,
    /// The veth end in the test's namespace (interface names: 15 bytes).
    operator_link: String,
    /// The second octet of the lab's `10.N.0.0/16`.
    network: u8,
    hub: String,
    hosts: Vec<Host>,
}

/// Runs `program args…`; its stdout, or what it said on failure.
fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|error| LabError::Spawn {
            command: command.clone(),
            error,
        })?;
    if !output.status.success() {
        return Err(LabError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `nft -f -` in `namespace` with `script` on its standard input.
fn nft_in(namespace: &str, script: &str) -> Result<(), LabError> {
    use std::io::Write;
    let command = format!("ip netns exec {namespace} nft -f -");
    let mut child = Command::new("ip")
        .args(["netns", "exec", namespace, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| LabError::Spawn {
            command: command.clone(),
            error,
        })?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(script.as_bytes())
            .map_err(|error| LabError::Spawn {
                command: command.clone(),
                error,
            })?;
    }
    let output = child.wait_with_output().map_err(|error| LabError::Spawn {
        command: command.clone(),
        error,
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(LabError::Failed {
            command: format!("{command} <<< {script:?}"),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The base table of every host: two hooked chains that send everything but
/// loopback to the `faults_in`/`faults_out` chains, which faults fill and
/// healing flushes.
const BASE_TABLE: &str = "table inet lab {
  chain faults_in {}
  chain faults_out {}
  chain input { type filter hook input priority 0; policy accept; iifname != \"lo\" jump faults_in; }
  chain output { type filter hook output priority 0; policy accept; oifname != \"lo\" jump faults_out; }
}
";

/// Removes the namespaces of labs whose test process is gone (a run killed
/// before its labs were dropped).
fn remove_abandoned_labs() {
    let Ok(listing) = run("ip", &["netns", "list"]) else {
        return;
    };
    for namespace in listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let Some(rest) = namespace.strip_prefix(NAMESPACE_PREFIX) else {
            continue;
        };
        let owner_alive = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<i32>().ok())
            .is_some_and(|pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            });
        if !owner_alive {
            let _ = run("ip", &["netns", "del", namespace]);
        }
    }
}

impl Lab {
    /// A new, empty lab; `None` when it cannot be built and
    /// [`SKIP_VARIABLE`] asks to skip; panics with the reason otherwise.
    pub fn start() -> Option<Lab> {
        match Lab::build() {
            Ok(lab) => Some(lab),
            Err(error) if std::env::var_os(SKIP_VARIABLE).is_some() => {
                eprintln!("skipped ({SKIP_VARIABLE} is set): {error}");
                None
            }
            Err(error) => panic!(
                "cannot build the network lab: {error}; set {SKIP_VARIABLE}=1 to skip the tests that need it"
            ),
        }
    }

    fn build() -> Result<Lab, LabError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(LabError::NotRoot);
        }
        run("nft", &["--version"])?;
        remove_abandoned_labs();
        let serial = LABS_MADE.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let name = format!("{NAMESPACE_PREFIX}{pid}-{serial}");
        let network = Lab::free_network(pid, serial)?;
        let hub = format!("{name}-hub");
        // From here on, a failure drops the half-made lab, which removes it.
        let lab = Lab {
            name,
            operator_link: format!("fl{pid}x{serial}"),
            network,
            hub,
            hosts: Vec::new(),
        };
        run("ip", &["netns", "add", &lab.hub])?;
        lab.in_hub(&["ip", "link", "add", "br0", "type", "bridge"])?;
        lab.in_hub(&["ip", "link", "set", "br0", "up"])?;
        // The test's own namespace joins the bridge as the operator address.
        let operator_link = lab.operator_link.clone();
        run(
            "ip",
            &[
                "link",
                "add",
                &operator_link,
                "type",
                "veth",
                "peer",
                "name",
                "operator",
                "netns",
                &lab.hub,
            ],
        )?;
        lab.attach_to_bridge("operator")?;
        let operator_address = format!("{}/16", lab.operator_address());
        run(
            "ip",
            &["addr", "add", &operator_address, "dev", &operator_link],
        )?;
        run("ip", &["link", "set", &operator_link, "up"])?;
        Ok(lab)
    }

    /// A `10.N.0.0/16` no interface of this machine uses, picked from the
    /// pid and the lab's serial so that parallel tests differ.
    fn free_network(pid: u32, serial: u32) -> Result<u8, LabError> {
        let in_use = run("ip", &["-o", "-4", "addr", "show"])?;
        let start = (pid.wrapping_mul(7).wrapping_add(serial.wrapping_mul(13))) % 150;
        (0..150)
            .map(|step| u8::try_from(64 + (start + step) % 150).unwrap_or(64))
            .find(|candidate| !in_use.contains(&format!(" 10.{candidate}.")))
            .ok_or(LabError::NoFreeRange)
    }

    fn in_hub(&self, command: &[&str]) -> Result<String, LabError> {
        let mut args = vec!["netns", "exec", self.hub.as_str()];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    fn attach_to_bridge(&self, link: &str) -> Result<(), LabError> {
        self.in_hub(&["ip", "link", "set", link, "master", "br0"])?;
        self.in_hub(&["ip", "link", "set", link, "up"])?;
        Ok(())
    }

    /// Where processes the test starts in its own namespace are reached
    /// from the hosts (zone 0): `10.N.0.254`.
    pub fn operator_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.network, 0, OPERATOR_HOST)
    }

    /// `10.N.zone.0/24`.
    pub fn zone_network(&self, zone: u8) -> String {
        format!("10.{}.{zone}.0/24", self.network)
    }

    /// Adds host `name` in `zone` (1..=253): its namespace, its veth on the
    /// bridge, its address, and the (empty) fault chains.
    pub fn add_host(&mut self, name: &str, zone: u8) -> Host {
        self.try_add_host(name, zone)
            .unwrap_or_else(|error| panic!("add host {name} to the lab: {error}"))
    }

    fn try_add_host(&mut self, name: &str, zone: u8) -> Result<Host, LabError> {
        let index = self.hosts.len() + 1;
        let host_number =
            u8::try_from(self.hosts.iter().filter(|host| host.zone == zone).count() + 1)
                .map_err(|_| LabError::NoFreeRange)?;
        let namespace = format!("{}-{index}", self.name);
        let address = Ipv4Addr::new(10, self.network, zone, host_number);
        run("ip", &["netns", "add", &namespace])?;
        let hub_link = format!("h{index}");
        run(
            "ip",
            &[
                "link", "add", "eth0", "netns", &namespace, "type", "veth", "peer", "name",
                &hub_link, "netns", &self.hub,
            ],
        )?;
        let host = Host {
            name: name.to_owned(),
            namespace,
            zone,
            address,
        };
        // Recorded before it is complete, so that a failure below still
        // removes the namespace.
        self.hosts.push(host.clone());
        self.attach_to_bridge(&hub_link)?;
        let with_prefix = format!("{address}/16");
        for command in [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "addr", "add", with_prefix.as_str(), "dev", "eth0"],
            vec!["ip", "link", "set", "eth0", "up"],
        ] {
            let mut args = vec!["netns", "exec", host.namespace.as_str()];
            args.extend(command);
            run("ip", &args)?;
        }
        nft_in(&host.namespace, BASE_TABLE)?;
        Ok(host)
    }

    fn hosts_in(&self, zone: u8) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(move |host| host.zone == zone)
    }

    fn add_rules(&self, zone: u8, rules: &str) {
        for host in self.hosts_in(zone) {
            nft_in(&host.namespace, rules)
                .unwrap_or_else(|error| panic!("fault on {}: {error}", host.name));
        }
    }

    /// Cuts `zone` off from everything outside it (other zones and the
    /// operator address), both ways: packets are dropped, not refused.
    pub fn cut_zone(&self, zone: u8) {
        let inside = self.zone_network(zone);
        self.add_rules(
            zone,
            &format!(
                "add rule inet lab faults_in ip saddr != {inside} counter drop\n\
                 add rule inet lab faults_out ip daddr != {inside} counter drop\n"
            ),
        );
    }

    /// Drops what the hosts of `zone` receive from `source`; what they send
    /// to it still arrives (a one-way partition).
    pub fn drop_from(&self, zone: u8, source: Ipv4Addr) {
        self.add_rules(
            zone,
            &format!("add rule inet lab faults_in ip saddr {source} counter drop\n"),
        );
    }

    /// Loses `percent` % of the packets the hosts of `zone` send and
    /// receive (each way, independently).
    pub fn lose_packets(&self, zone: u8, percent: u8) {
        self.add_rules(
            zone,
            &format!(
                "add rule inet lab faults_in numgen random mod 100 < {percent} counter drop\n\
                 add rule inet lab faults_out numgen random mod 100 < {percent} counter drop\n"
            ),
        );
    }

    /// Removes every fault of `zone`.
    pub fn heal(&self, zone: u8) {
        self.add_rules(
            zone,
            "flush chain inet lab faults_in\nflush chain inet lab faults_out\n",
        );
    }

    /// How many packets the fault rules of `host` dropped so far: proof
    /// that a fault was really in the way.
    pub fn dropped_packets(&self, host: &Host) -> u64 {
        let listing = run(
            "ip",
            &[
                "netns",
                "exec",
                &host.namespace,
                "nft",
                "list",
                "table",
                "inet",
                "lab",
            ],
        )
        .unwrap_or_else(|error| panic!("read the fault counters of {}: {error}", host.name));
        listing
            .split("counter packets ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = run("ip", &["netns", "del", &host.namespace]);
        }
        // The hub holds the bridge and every veth peer: removing it removes
        // the operator link in the test's namespace too.
        let _ = run("ip", &["netns", "del", &self.hub]);
    }
}

/// A TCP forwarder adding `delay` to every byte, each way: what a long or
/// congested path does to a connection (there is no `tc netem` here).
/// Listens on an address of the test's namespace; stops when dropped.
#[derive(Debug)]
pub struct DelayingForwarder {
    pub address: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl DelayingForwarder {
    /// Forwards connections to `listen` (port 0: any) to `upstream`.
    pub fn start(listen: SocketAddr, upstream: SocketAddr, delay: Duration) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("forwarder runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .expect("bind the delaying forwarder");
        let address = listener.local_addr().expect("forwarder address");
        runtime.spawn(async move {
            while let Ok((downstream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(upstream) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (down_read, down_write) = downstream.into_split();
                    let (up_read, up_write) = upstream.into_split();
                    tokio::join!(
                        delayed_copy(down_read, up_write, delay),
                        delayed_copy(up_read, down_write, delay)
                    );
                });
            }
        });
        DelayingForwarder {
            address,
            runtime: Some(runtime),
        }
    }
}

impl Drop for DelayingForwarder {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read;
/// reading goes on meanwhile, so the delay adds latency, not a bandwidth
/// limit.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (sender, mut receiver) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, chunk)) = receiver.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => {
                    let due = tokio::time::Instant::now() + delay;
                    if sender.send((due, buffer[..read].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}
