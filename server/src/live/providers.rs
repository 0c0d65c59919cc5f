//! Where replacement machines come from, behind one trait: `command` runs a
//! configured executable (a cloud API or hypervisor script) with the sick
//! machine's description as JSON on stdin and a fresh join token in
//! `FLOTTE_JOIN_TOKEN`; `local` starts a new `flotte-agent` process on this
//! host (for demos and tests). A provider only *asks* for a machine: the
//! event closes when the replacement enrolls and turns operational.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::domain::repair::settings::{ProviderKind, ProviderSettings};

/// Output kept from a command provider, per stream.
const OUTPUT_LIMIT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {timeout:?}")]
    Timeout { program: PathBuf, timeout: Duration },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no provider named {0:?}")]
    Unknown(String),
}

/// What a provider is told about the machine to replace (stdin of a
/// `command` provider, as JSON).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReplacementRequest {
    pub event_id: String,
    pub machine_id: String,
    pub hostname: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub state: String,
    pub reason: String,
    /// The join token the replacement must enroll with (also in
    /// `FLOTTE_JOIN_TOKEN`; never logged).
    #[serde(skip)]
    pub join_token: String,
}

#[async_trait::async_trait]
pub trait ReplacementProvider: Send + Sync {
    /// Asks for a replacement; the answer is a short description for the event.
    async fn request_replacement(
        &self,
        request: &ReplacementRequest,
    ) -> Result<String, ProviderError>;
    /// Stops what the provider runs itself (the `local` agents) at shutdown.
    fn shutdown(&self) {}
}

/// Runs an executable per request.
#[derive(Debug)]
pub struct CommandProvider {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub timeout: Duration,
}

fn truncated(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_LIMIT)]);
    text.trim().to_owned()
}

#[async_trait::async_trait]
impl ReplacementProvider for CommandProvider {
    async fn request_replacement(
        &self,
        request: &ReplacementRequest,
    ) -> Result<String, ProviderError> {
        let spawn_error = |source| ProviderError::Spawn {
            program: self.program.clone(),
            source,
        };
        let mut child = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .env("FLOTTE_JOIN_TOKEN", &request.join_token)
            .env("FLOTTE_REMEDIATION_EVENT", &request.event_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let description = serde_json::to_vec(request).unwrap_or_default();
        if let Some(mut stdin) = child.stdin.take() {
            // A program that does not read its stdin is its own business.
            let _ = stdin.write_all(&description).await;
        }
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let run = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let read_out = async {
                if let Some(stream) = stdout.as_mut() {
                    let _ = stream.read_to_end(&mut out).await;
                }
            };
            let read_err = async {
                if let Some(stream) = stderr.as_mut() {
                    let _ = stream.read_to_end(&mut err).await;
                }
            };
            tokio::join!(read_out, read_err);
            let status = child.wait().await;
            (status, out, err)
        };
        let (status, out, err) =
            tokio::time::timeout(self.timeout, run)
                .await
                .map_err(|_| ProviderError::Timeout {
                    program: self.program.clone(),
                    timeout: self.timeout,
                })?;
        let status = status.map_err(spawn_error)?;
        if status.success() {
            Ok(truncated(&out))
        } else {
            Err(ProviderError::Failed {
                program: self.program.clone(),
                status: status.to_string(),
                stderr: truncated(&err),
            })
        }
    }
}

/// Starts a new agent process on this host per request; the agents run as
/// children of the server and are stopped with it.
pub struct LocalAgentProvider {
    pub agent_binary: PathBuf,
    pub base_dir: PathBuf,
    pub server: String,
    pub agent_config: Option<PathBuf>,
    pub agent_args: Vec<String>,
    children: Mutex<Vec<tokio::process::Child>>,
}

impl std::fmt::Debug for LocalAgentProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAgentProvider")
            .field("agent_binary", &self.agent_binary)
            .field("base_dir", &self.base_dir)
            .finish_non_exhaustive()
    }
}

/// The hostname of a replacement: the original's, marked, with the event's
/// first characters so that successive replacements differ.
pub fn replacement_hostname(hostname: &str, event_id: &str) -> String {
    let suffix: String = event_id.chars().take(6).collect();
    format!("{hostname}-r{suffix}")
}

#[async_trait::async_trait]
impl ReplacementProvider for LocalAgentProvider {
    async fn request_replacement(
        &self,
        request: &ReplacementRequest,
    ) -> Result<String, ProviderError> {
        let hostname = replacement_hostname(&request.hostname, &request.event_id);
        let data_dir = self.base_dir.join(&hostname);
        let io_error = |path: &PathBuf| {
            let path = path.clone();
            move |source| ProviderError::Io { path, source }
        };
        tokio::fs::create_dir_all(&data_dir)
            .await
            .map_err(io_error(&data_dir))?;
        let log_path = data_dir.join("agent.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_error(&log_path))?;
        let log_for_stderr = log.try_clone().map_err(io_error(&log_path))?;
        let mut command = tokio::process::Command::new(&self.agent_binary);
        command
            .arg("run")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--server", &self.server, "--hostname", &hostname])
            // The token travels in the environment, never on a command line
            // that `ps` shows.
            .env("FLOTTE_JOIN_TOKEN", &request.join_token)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .kill_on_drop(true);
        if let Some(config) = &self.agent_config {
            command.arg("--config").arg(config);
        }
        command.args(&self.agent_args);
        let child = command.spawn().map_err(|source| ProviderError::Spawn {
            program: self.agent_binary.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let pid_path = data_dir.join("agent.pid");
        flotte_proto::files::write_atomically(&pid_path, format!("{pid}\n").as_bytes())
            .map_err(io_error(&pid_path))?;
        let mut children = self
            .children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Reap the agents that exited by themselves (no zombie is kept).
        children.retain_mut(|child| matches!(child.try_wait(), Ok(None)));
        children.push(child);
        Ok(format!(
            "started agent {hostname} (pid {pid}) in {}",
            data_dir.display()
        ))
    }

    fn shutdown(&self) {
        let mut children = self
            .children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for child in children.iter_mut() {
            let _ = child.start_kill();
        }
        children.clear();
    }
}

/// The configured providers by name.
pub struct Providers {
    by_name: BTreeMap<String, Box<dyn ReplacementProvider>>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

impl Providers {
    pub fn from_settings(settings: &[ProviderSettings]) -> Self {
        let by_name = settings
            .iter()
            .map(|provider| {
                let implementation: Box<dyn ReplacementProvider> = match &provider.kind {
                    ProviderKind::Command {
                        program,
                        args,
                        timeout,
                    } => Box::new(CommandProvider {
                        program: program.clone(),
                        args: args.clone(),
                        timeout: *timeout,
                    }),
                    ProviderKind::Local {
                        agent_binary,
                        base_dir,
                        server,
                        agent_config,
                        agent_args,
                    } => Box::new(LocalAgentProvider {
                        agent_binary: agent_binary.clone(),
                        base_dir: base_dir.clone(),
                        server: server.clone(),
                        agent_config: agent_config.clone(),
                        agent_args: agent_args.clone(),
                        children: Mutex::new(Vec::new()),
                    }),
                };
                (provider.name.clone(), implementation)
            })
            .collect();
        Providers { by_name }
    }

    pub async fn request_replacement(
        &self,
        provider: &str,
        request: &ReplacementRequest,
    ) -> Result<String, ProviderError> {
        self.by_name
            .get(provider)
            .ok_or_else(|| ProviderError::Unknown(provider.to_owned()))?
            .request_replacement(request)
            .await
    }

    pub fn shutdown(&self) {
        for provider in self.by_name.values() {
            provider.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request() -> ReplacementRequest {
        ReplacementRequest {
            event_id: "ev123456789".into(),
            machine_id: "m-1".into(),
            hostname: "web-1".into(),
            zone: "dc1".into(),
            labels: [("role".to_owned(), "web".to_owned())].into(),
            state: "down".into(),
            reason: "down for more than 1m".into(),
            join_token: "flotte1.secret".into(),
        }
    }

    #[tokio::test]
    async fn the_command_provider_gets_the_machine_on_stdin_and_the_token_in_its_environment() {
        let provider = CommandProvider {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "read -r machine; echo \"token=$FLOTTE_JOIN_TOKEN machine=$machine\"".into(),
            ],
            timeout: Duration::from_secs(10),
        };
        let answer = provider.request_replacement(&request()).await.unwrap();
        assert!(
            answer.starts_with("token=flotte1.secret machine={"),
            "{answer}"
        );
        assert!(answer.contains("\"zone\":\"dc1\""), "{answer}");
        assert!(answer.contains("\"labels\":{\"role\":\"web\"}"), "{answer}");
        assert!(!answer.contains("join_token"), "{answer}");
    }

    #[tokio::test]
    async fn a_failing_or_slow_command_is_an_error_naming_the_cause() {
        let failing = CommandProvider {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo quota exceeded >&2; exit 3".into()],
            timeout: Duration::from_secs(10),
        };
        let error = failing.request_replacement(&request()).await.unwrap_err();
        assert!(error.to_string().contains("quota exceeded"), "{error}");
        let slow = CommandProvider {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "sleep 5".into()],
            timeout: Duration::from_millis(200),
        };
        let error = slow.request_replacement(&request()).await.unwrap_err();
        assert!(matches!(error, ProviderError::Timeout { .. }), "{error}");
        let missing = CommandProvider {
            program: "/nonexistent/provider".into(),
            args: vec![],
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            missing.request_replacement(&request()).await.unwrap_err(),
            ProviderError::Spawn { .. }
        ));
    }

    #[test]
    fn replacement_hostnames_name_the_original_and_the_event() {
        assert_eq!(replacement_hostname("web-1", "ab12cd34ef"), "web-1-rab12cd");
    }
}
