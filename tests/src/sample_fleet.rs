//! A fleet running the sample service, for rollout tests and the demo: a
//! server trusting a fresh release key, sample images (`app@VERSION`,
//! healthy, broken, or breaking some seconds after start), and agents that
//! each serve the image on their own port and check it.
//!
//! Every machine shares one host, so the image's service reads its port
//! from `<agent data dir>/service.port` (`--port-file ../../service.port`,
//! relative to the unpacked image), and the health check lives in each
//! agent's own config rather than in the image.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{binary, wait_until, Agent, Server};

/// A TCP port on 127.0.0.1 that was free a moment ago. Only for what must
/// be told its port before it starts and cannot report a port it bound
/// itself: sshd's `Port`, and a health check's URL written into an agent's
/// config before the service it checks exists. Everything else binds
/// `127.0.0.1:0` and reads back the address it got.
pub fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
}

/// Makes a release key pair in `<root>/keys` and trusts it; returns the
/// directory (`release.key`, `release.pub`).
pub fn trust_new_release_key(server: &Server, root: &Path) -> PathBuf {
    let keys = root.join("keys");
    server.ctl_ok(&[
        "image",
        "keygen",
        "--out",
        keys.to_str().expect("UTF-8 path"),
    ]);
    let public = keys.join("release.pub");
    server.ctl_ok(&[
        "image",
        "trust",
        "add",
        public.to_str().expect("UTF-8 path"),
    ]);
    keys
}

/// How a sample image behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Behaviour {
    Healthy,
    /// Healthy for this many seconds after start, failing afterwards.
    BreaksAfter(f64),
}

/// Builds and pushes `app@version` (the sample service); returns its file.
pub fn push_sample_image(
    server: &Server,
    root: &Path,
    keys: &Path,
    version: &str,
    behaviour: Behaviour,
) -> PathBuf {
    let tree = root.join(format!("tree-{version}"));
    std::fs::create_dir_all(tree.join("bin")).expect("image tree");
    std::fs::copy(binary("flotte-sample-service"), tree.join("bin/app")).expect("copy service");
    std::fs::write(tree.join("VERSION"), version).expect("VERSION");
    let mut service = format!("bin/app --port-file ../../service.port --version v{version}");
    if let Behaviour::BreaksAfter(seconds) = behaviour {
        service.push_str(&format!(" --unhealthy-after {seconds}"));
    }
    let out = root.join(format!("app-{version}.flotte"));
    let key = keys.join("release.key");
    let path = |path: &Path| path.to_str().expect("UTF-8 path").to_owned();
    server.ctl_ok(&[
        "image",
        "build",
        &path(&tree),
        "--name",
        "app",
        "--version",
        version,
        "--key",
        &path(&key),
        "--out",
        &path(&out),
        "--service",
        &service,
    ]);
    server.ctl_ok(&["image", "push", &path(&out)]);
    out
}

/// Builds (does not push) `app@version`: the sample service listening on a
/// fixed `port`, with `extra_service_args` (e.g. ` --unhealthy`), an http
/// check of its own in the manifest, and whatever `<root>/tree-VERSION`
/// already holds. For single-machine tests and benchmarks; the fleet above
/// uses `push_sample_image` (a port per machine).
pub fn build_sample_image_on_port(
    server: &Server,
    root: &Path,
    keys: &Path,
    version: &str,
    port: u16,
    extra_service_args: &str,
) -> PathBuf {
    build_sample_image_with(
        server,
        root,
        keys,
        SampleImage {
            version,
            port,
            extra_service_args,
            extra_build_args: &[],
        },
    )
}

/// What [`build_sample_image_with`] builds beyond the sample service.
pub struct SampleImage<'a> {
    pub version: &'a str,
    pub port: u16,
    pub extra_service_args: &'a str,
    /// More `flottectl image build` arguments (e.g. `--mutable var`).
    pub extra_build_args: &'a [&'a str],
}

/// [`build_sample_image_on_port`] with more on the `image build` command line.
pub fn build_sample_image_with(
    server: &Server,
    root: &Path,
    keys: &Path,
    image: SampleImage<'_>,
) -> PathBuf {
    let SampleImage {
        version,
        port,
        extra_service_args,
        extra_build_args,
    } = image;
    let tree = root.join(format!("tree-{version}"));
    std::fs::create_dir_all(tree.join("bin")).expect("image tree");
    std::fs::copy(binary("flotte-sample-service"), tree.join("bin/app")).expect("copy service");
    std::fs::write(tree.join("VERSION"), version).expect("VERSION");
    let checks = root.join("checks.toml");
    std::fs::write(
        &checks,
        format!("[[check]]\nname = \"http\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/health\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n"),
    )
    .expect("checks file");
    let service = format!("bin/app --port {port} --version v{version}{extra_service_args}");
    let out = root.join(format!("app-{version}.flotte"));
    let path = |path: &Path| path.to_str().expect("UTF-8 path").to_owned();
    let mut arguments = vec![
        "image".to_owned(),
        "build".to_owned(),
        path(&tree),
        "--name".to_owned(),
        "app".to_owned(),
        "--version".to_owned(),
        version.to_owned(),
        "--key".to_owned(),
        path(&keys.join("release.key")),
        "-o".to_owned(),
        path(&out),
        "--service".to_owned(),
        service,
        "--checks".to_owned(),
        path(&checks),
    ];
    arguments.extend(
        extra_build_args
            .iter()
            .map(|argument| (*argument).to_owned()),
    );
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    server.ctl_ok(&arguments);
    out
}

/// One machine of the sample fleet.
#[derive(Debug)]
pub struct SampleMachine {
    pub agent: Agent,
    pub zone: String,
    pub port: u16,
}

impl SampleMachine {
    /// How many times the agent logged committing `app@version`: swaps as
    /// the machine itself saw them.
    pub fn commits_of(&self, version: &str) -> usize {
        let wanted = format!("image=app@{version}");
        self.agent
            .log()
            .lines()
            .filter(|line| line.contains("swap committed") && line.contains(&wanted))
            .count()
    }

    /// What the machine's service answers on `/` (its version), if anything.
    pub fn serves(&self) -> Option<String> {
        crate::http_get(&format!("127.0.0.1:{}", self.port), "/")
            .ok()
            .map(|(_, body)| body.trim().to_owned())
    }
}

/// Enrolls and starts an agent `name` in `zone` with `labels`, serving the
/// sample images on a port of its own and checking it.
pub fn start_sample_machine(
    server: &Server,
    root: &Path,
    keys: &Path,
    name: &str,
    zone: &str,
    labels: &str,
) -> SampleMachine {
    start_sample_machine_with_servers(server, &[], root, keys, name, zone, labels)
}

/// Starts one sample machine per `(hostname, zone, labels)` and waits until
/// every one holds a session (failing with their logs otherwise).
pub fn start_sample_fleet(
    server: &Server,
    root: &Path,
    keys: &Path,
    fleet: &[(&str, &str, &str)],
) -> Vec<SampleMachine> {
    let machines: Vec<SampleMachine> = fleet
        .iter()
        .map(|(name, zone, labels)| start_sample_machine(server, root, keys, name, zone, labels))
        .collect();
    assert!(
        wait_until(Duration::from_secs(60), || server.connected_count()
            == fleet.len()),
        "agents did not connect:\n{}",
        machines
            .iter()
            .map(|machine| machine.agent.log())
            .collect::<Vec<_>>()
            .join("\n")
    );
    machines
}

/// [`start_sample_machine`] with an agent that also knows the server
/// replicas at `more_servers` (it starts at a random one of them all).
pub fn start_sample_machine_with_servers(
    server: &Server,
    more_servers: &[&str],
    root: &Path,
    keys: &Path,
    name: &str,
    zone: &str,
    labels: &str,
) -> SampleMachine {
    let mut machine = prepare_sample_machine(server, more_servers, root, keys, name, zone, labels);
    machine.agent.start();
    machine
}

/// [`start_sample_machine_with_servers`] without starting the agent (to
/// start it elsewhere, e.g. in a network namespace).
pub fn prepare_sample_machine(
    server: &Server,
    more_servers: &[&str],
    root: &Path,
    keys: &Path,
    name: &str,
    zone: &str,
    labels: &str,
) -> SampleMachine {
    let port = free_port().expect("a free port");
    let token = server.token(labels, zone, &[]);
    let agent = Agent::new(root, name, &server.address, &token)
        .with_more_servers(more_servers)
        .with_config(&format!(
            "[images]\nrelease_keys = [\"{}\"]\nverify_deadline = \"20s\"\nsoak = \"500ms\"\n\n\
         [[check]]\nname = \"service\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/health\"\n\
         interval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\ncritical = true\n",
            keys.join("release.pub").display()
        ));
    std::fs::write(agent.data_dir.join("service.port"), format!("{port}\n")).expect("port file");
    SampleMachine {
        agent,
        zone: zone.to_owned(),
        port,
    }
}

/// Sets `app@version` on each of `hostnames` directly (`machines set-image`).
pub fn set_image_on(server: &Server, hostnames: &[&str], version: &str) -> Result<(), String> {
    let reference = format!("app@{version}");
    for hostname in hostnames {
        let output = server.ctl(&["machines", "set-image", hostname, &reference]);
        if !output.status.success() {
            return Err(format!(
                "set-image {hostname} {reference}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// Whether every machine runs `app@version` and is operational.
pub fn fleet_runs(server: &Server, version: &str) -> bool {
    let reference = format!("app@{version}");
    server.machines().iter().all(|shown| {
        shown["current_image"] == reference.as_str() && shown["state"] == "operational"
    })
}

/// Sets `app@version` on every machine directly and waits until each runs
/// it and is operational (the fleet's starting point before a rollout).
pub fn set_image_everywhere(server: &Server, machines: &[SampleMachine], version: &str) {
    let hostnames: Vec<&str> = machines
        .iter()
        .map(|machine| machine.agent.name.as_str())
        .collect();
    if let Err(error) = set_image_on(server, &hostnames, version) {
        panic!("{error}");
    }
    let ready = wait_until(Duration::from_secs(120), || fleet_runs(server, version));
    assert!(
        ready,
        "the fleet did not reach app@{version}: {:#?}",
        server.machines()
    );
}

/// Fills `directory` with `files` files of incompressible bytes (xorshift),
/// `total_bytes` in all.
pub fn write_incompressible_tree(
    directory: &Path,
    total_bytes: u64,
    files: u64,
) -> Result<(), String> {
    std::fs::create_dir_all(directory).map_err(|error| error.to_string())?;
    let per_file = total_bytes / files.max(1);
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut buffer = vec![0u8; 1 << 20];
    for index in 0..files {
        use std::io::Write;
        let path = directory.join(format!("blob-{index:04}.bin"));
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path).map_err(|error| format!("{}: {error}", path.display()))?,
        );
        let mut left = per_file;
        while left > 0 {
            for word in buffer.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            let take = usize::try_from(left.min(buffer.len() as u64)).unwrap_or(buffer.len());
            file.write_all(&buffer[..take])
                .map_err(|error| error.to_string())?;
            left -= take as u64;
        }
        file.flush().map_err(|error| error.to_string())?;
    }
    Ok(())
}
