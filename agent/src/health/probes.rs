//! The probes behind health checks: HTTP status, TCP connect, and a command's
//! exit code. Each is bounded by its timeout (a hanging command is killed with
//! its whole process group) and keeps at most [`MAX_OUTPUT_BYTES`] of output.

use std::time::Duration;

use flotte_proto::http::{request, HttpEndpoint, OutgoingRequest};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Output kept per check result; the rest is read and discarded.
pub const MAX_OUTPUT_BYTES: usize = 4096;

/// The raw result of one probe run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub passed: bool,
    pub output: String,
}

impl ProbeOutcome {
    fn fail(output: impl Into<String>) -> Self {
        ProbeOutcome {
            passed: false,
            output: output.into(),
        }
    }
}

/// Something that can be checked; the seam between check scheduling and I/O.
#[async_trait::async_trait]
pub trait Probe: Send + Sync {
    async fn run(&self, timeout: Duration) -> ProbeOutcome;
}

fn truncate_output(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_OUTPUT_BYTES)]);
    // Lossy decoding may have grown a cut multi-byte character; keep the bound.
    let mut text = text.into_owned();
    while text.len() > MAX_OUTPUT_BYTES {
        text.pop();
    }
    text
}

#[derive(Debug, Clone)]
pub struct HttpProbe {
    pub endpoint: HttpEndpoint,
    pub expected_status: u16,
}

#[async_trait::async_trait]
impl Probe for HttpProbe {
    async fn run(&self, timeout: Duration) -> ProbeOutcome {
        let answer = request(
            &self.endpoint,
            OutgoingRequest::get(),
            timeout,
            MAX_OUTPUT_BYTES,
        )
        .await;
        match answer {
            Ok(response) => {
                let body = truncate_output(&response.body);
                ProbeOutcome {
                    passed: response.status == self.expected_status,
                    output: format!(
                        "{} (expected {})\n{body}",
                        response.status_line(),
                        self.expected_status
                    ),
                }
            }
            Err(error) => ProbeOutcome::fail(error.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TcpProbe {
    pub address: String,
}

#[async_trait::async_trait]
impl Probe for TcpProbe {
    async fn run(&self, timeout: Duration) -> ProbeOutcome {
        match tokio::time::timeout(timeout, TcpStream::connect(&self.address)).await {
            Ok(Ok(_)) => ProbeOutcome {
                passed: true,
                output: format!("connected to {}", self.address),
            },
            Ok(Err(error)) => {
                ProbeOutcome::fail(format!("cannot connect to {}: {error}", self.address))
            }
            Err(_) => ProbeOutcome::fail(format!(
                "connect to {} timed out after {timeout:?}",
                self.address
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExecProbe {
    pub command: String,
    pub args: Vec<String>,
}

/// Reads at most [`MAX_OUTPUT_BYTES`] from `reader`, draining the rest so the
/// command never blocks on a full pipe.
async fn read_bounded(mut reader: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return kept,
            Ok(read) => {
                let room = MAX_OUTPUT_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..read.min(room)]);
            }
        }
    }
}

fn kill_process_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|pid| i32::try_from(pid).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[async_trait::async_trait]
impl Probe for ExecProbe {
    async fn run(&self, timeout: Duration) -> ProbeOutcome {
        let mut command = tokio::process::Command::new(&self.command);
        command
            .args(&self.args)
            .env_remove(crate::image::service::JOIN_TOKEN_VARIABLE)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Its own process group, so that a timeout kills what it started too.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                return ProbeOutcome::fail(format!("cannot run {}: {error}", self.command))
            }
        };
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let run = async {
            let (out, err, status) = tokio::join!(
                async {
                    match stdout {
                        Some(stdout) => read_bounded(stdout).await,
                        None => Vec::new(),
                    }
                },
                async {
                    match stderr {
                        Some(stderr) => read_bounded(stderr).await,
                        None => Vec::new(),
                    }
                },
                child.wait()
            );
            (out, err, status)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok((mut out, err, status)) => {
                out.extend_from_slice(&err);
                let output = truncate_output(&out);
                match status {
                    Ok(status) if status.success() => ProbeOutcome {
                        passed: true,
                        output,
                    },
                    Ok(status) => {
                        let separator = if output.is_empty() || output.ends_with('\n') {
                            ""
                        } else {
                            "\n"
                        };
                        // `status` reads "exit status: N" or "signal: N".
                        ProbeOutcome::fail(format!("{output}{separator}{status}"))
                    }
                    Err(error) => {
                        ProbeOutcome::fail(format!("cannot wait for {}: {error}", self.command))
                    }
                }
            }
            Err(_) => {
                kill_process_group(pid);
                ProbeOutcome::fail(format!(
                    "{} timed out after {timeout:?} and was killed",
                    self.command
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(script: &str) -> ExecProbe {
        ExecProbe {
            command: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
        }
    }

    #[tokio::test]
    async fn exec_passes_on_zero_and_keeps_output_of_failures() {
        let passed = exec("echo fine").run(Duration::from_secs(5)).await;
        assert!(passed.passed);
        assert_eq!(passed.output, "fine\n");
        let failed = exec("echo broken >&2; exit 3")
            .run(Duration::from_secs(5))
            .await;
        assert!(!failed.passed);
        assert!(failed.output.contains("broken"), "{}", failed.output);
        assert!(
            failed.output.contains("exit status: 3"),
            "{}",
            failed.output
        );
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_at_its_timeout_with_its_children() {
        let started = std::time::Instant::now();
        let outcome = exec("sleep 30 & sleep 30")
            .run(Duration::from_millis(300))
            .await;
        assert!(!outcome.passed);
        assert!(outcome.output.contains("timed out"), "{}", outcome.output);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn output_is_bounded() {
        let outcome = exec("head -c 100000 /dev/zero | tr '\\0' x")
            .run(Duration::from_secs(5))
            .await;
        assert!(outcome.passed);
        assert_eq!(outcome.output.len(), MAX_OUTPUT_BYTES);
    }

    #[tokio::test]
    async fn tcp_and_http_probes_fail_on_a_closed_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let tcp = TcpProbe {
            address: address.clone(),
        }
        .run(Duration::from_secs(2))
        .await;
        assert!(!tcp.passed);
        let http = HttpProbe {
            endpoint: HttpEndpoint::from_settings(&format!("http://{address}/"), None).unwrap(),
            expected_status: 200,
        }
        .run(Duration::from_secs(2))
        .await;
        assert!(!http.passed);
        assert!(http.output.contains("cannot connect"), "{}", http.output);
    }
}
