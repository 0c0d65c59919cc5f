//! Agent settings: `agent.toml` (`--config`) or the same settings as flags,
//! parsed once at start and validated with every problem listed together.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::net::SocketAddr;

use flotte_proto::join_token::JoinToken;
use serde::Deserialize;

use crate::access::files::is_safe_login;

use flotte_proto::release_keys::{parse_release_key, ReleasePublicKey};
pub use flotte_proto::settings::ConfigError;
use flotte_proto::settings::{parse_duration_field, parse_listen_field, read_toml};

use crate::health::{validate_checks, CheckConfigFile, CheckSpec};
use crate::image::service::ServiceMode;
use crate::image::unpack::UnpackPolicy;
use crate::system::SystemThresholds;

/// Settings as written in the TOML file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfigFile {
    /// Where the identity, state and (later) images live.
    #[serde(default)]
    pub data_dir: PathBuf,
    /// Server addresses (`host:port`): sessions start at a random one and
    /// move to the next on failure (enrollment tries them in order).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Join token for the first start; ignored once an identity exists.
    #[serde(default)]
    pub join_token: Option<String>,
    /// File holding the join token (keeps the secret out of the config file).
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// Report interval used until the server sends its own.
    /// Hostname to report instead of the kernel's (several agents on one host).
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default = "default_report_interval")]
    pub report_interval: String,
    #[serde(default = "default_initial_backoff")]
    pub reconnect_initial_backoff: String,
    #[serde(default = "default_max_backoff")]
    pub reconnect_max_backoff: String,
    /// Address of the Prometheus `/metrics` listener (disabled if absent).
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Health checks (`[[check]]` tables).
    #[serde(default, rename = "check")]
    pub checks: Vec<CheckConfigFile>,
    /// System metrics and their thresholds (`[system]`).
    #[serde(default)]
    pub system: SystemConfigFile,
    /// Image swaps (`[images]`).
    #[serde(default)]
    pub images: ImagesConfigFile,
    /// The service images provide (`[service]`).
    #[serde(default)]
    pub service: ServiceConfigFile,
    /// What a quarantine does on this machine (`[quarantine]`).
    #[serde(default)]
    pub quarantine: QuarantineConfigFile,
    /// SSH access for people (`[access]`); absent: not managed here.
    #[serde(default)]
    pub access: Option<crate::access::settings::AccessConfigFile>,
}

/// The `[quarantine]` table: hooks run when the server quarantines or
/// releases this machine. Nothing is ever wiped.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfigFile {
    /// Program and arguments run once per quarantine (e.g. leave the load
    /// balancer); FLOTTE_QUARANTINE_ID, _REASON and _BY are in its environment.
    pub on_quarantine: Option<Vec<String>>,
    /// Run when the quarantine is lifted.
    pub on_release: Option<Vec<String>>,
    /// Stop the supervised service while quarantined (default: keep it running,
    /// so that it can be investigated as it is).
    pub stop_service: bool,
    pub hook_timeout: String,
    /// List processes in the forensic bundle by their short name only,
    /// leaving out command lines (which may hold secrets passed as arguments).
    pub omit_command_lines: bool,
}

impl Default for QuarantineConfigFile {
    fn default() -> Self {
        QuarantineConfigFile {
            on_quarantine: None,
            on_release: None,
            stop_service: false,
            hook_timeout: "60s".into(),
            omit_command_lines: false,
        }
    }
}

/// The `[images]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfigFile {
    /// Files holding the release public keys trusted to sign images.
    pub release_keys: Vec<PathBuf>,
    pub max_unpacked_bytes: u64,
    pub allow_setuid: bool,
    /// Unpacked images kept on disk (at least current and previous).
    pub keep: usize,
    pub verify_deadline: String,
    pub soak: String,
    /// Between integrity verifications of the running image (±10 % jitter).
    pub verify_interval: String,
    /// Reading rate of a verification, bytes per second (0: unlimited).
    pub verify_bytes_per_second: u64,
    /// "report" (default) or "restore" (re-create the tree from the signed payload).
    pub on_drift: String,
    /// A drifted tree replaced by a restore is kept unless larger than this.
    pub keep_drifted_max_bytes: u64,
}

impl Default for ImagesConfigFile {
    fn default() -> Self {
        ImagesConfigFile {
            release_keys: Vec::new(),
            max_unpacked_bytes: 8 * 1024 * 1024 * 1024,
            allow_setuid: false,
            keep: 3,
            verify_deadline: "60s".into(),
            soak: "10s".into(),
            verify_interval: "6h".into(),
            verify_bytes_per_second: 20_000_000,
            on_drift: "report".into(),
            keep_drifted_max_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// The `[service]` table: how the image's service is run.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfigFile {
    /// "supervised" (the agent runs it), "restart-command" or "none".
    pub mode: String,
    /// Overrides the image manifest's command (supervised mode).
    pub command: Option<Vec<String>>,
    /// Run after each switch (restart-command mode).
    pub restart_command: Option<Vec<String>>,
    pub log_max_bytes: u64,
    /// Who the supervised service runs as (overrides the manifest's).
    pub user: Option<String>,
    /// Its group (default: the user's primary group).
    pub group: Option<String>,
}

impl Default for ServiceConfigFile {
    fn default() -> Self {
        ServiceConfigFile {
            mode: "supervised".into(),
            command: None,
            restart_command: None,
            log_max_bytes: 10 * 1024 * 1024,
            user: None,
            group: None,
        }
    }
}

/// The `[system]` table: which mounts to watch and which thresholds make the
/// machine degraded. Absent thresholds are not checked.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SystemConfigFile {
    #[serde(default = "default_mounts")]
    pub mounts: Vec<PathBuf>,
    #[serde(default = "default_system_interval")]
    pub interval: String,
    #[serde(default)]
    pub disk_used_percent_max: Option<f64>,
    #[serde(default)]
    pub memory_available_percent_min: Option<f64>,
    #[serde(default)]
    pub load1_max: Option<f64>,
}

impl Default for SystemConfigFile {
    fn default() -> Self {
        SystemConfigFile {
            mounts: default_mounts(),
            interval: default_system_interval(),
            disk_used_percent_max: None,
            memory_available_percent_min: None,
            load1_max: None,
        }
    }
}

fn default_mounts() -> Vec<PathBuf> {
    vec![PathBuf::from("/")]
}
fn default_system_interval() -> String {
    "10s".into()
}

fn default_report_interval() -> String {
    "10s".into()
}
fn default_initial_backoff() -> String {
    "500ms".into()
}
fn default_max_backoff() -> String {
    "2m".into()
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub servers: Vec<String>,
    pub join_token: Option<JoinToken>,
    pub hostname: Option<String>,
    pub report_interval: Duration,
    pub reconnect_initial_backoff: Duration,
    pub reconnect_max_backoff: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub checks: Vec<CheckSpec>,
    pub system: SystemThresholds,
    pub system_interval: Duration,
    pub release_keys: Vec<ReleasePublicKey>,
    pub unpack: UnpackPolicy,
    pub keep_images: usize,
    pub verify_deadline: Duration,
    pub soak: Duration,
    pub integrity: crate::image::integrity::IntegritySettings,
    pub keep_drifted_max_bytes: u64,
    pub service: ServiceMode,
    pub quarantine: crate::repair::QuarantineSettings,
    pub access: Option<crate::access::AccessSettings>,
}

pub fn read_config_file(path: &Path) -> Result<AgentConfigFile, ConfigError> {
    read_toml(path)
}

fn valid_server_address(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0),
        None => false,
    }
}

impl AgentConfigFile {
    pub fn validate(self) -> Result<AgentConfig, ConfigError> {
        let mut problems = Vec::new();
        if self.data_dir.as_os_str().is_empty() {
            problems.push("data_dir must not be empty".to_owned());
        }
        if self.servers.is_empty() {
            problems.push("servers must list at least one host:port".to_owned());
        }
        for address in &self.servers {
            if !valid_server_address(address) {
                problems.push(format!("servers: {address:?} is not host:port"));
            }
        }
        let token_text = match (&self.join_token, &self.join_token_file) {
            (Some(_), Some(_)) => {
                problems.push("give join_token or join_token_file, not both".to_owned());
                None
            }
            (Some(token), None) => Some(token.clone()),
            // Once enrolled the token is never used: its file may be gone.
            (None, Some(_)) if self.data_dir.join("identity").join("cert.pem").exists() => None,
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(text) => Some(text.trim().to_owned()),
                Err(error) => {
                    problems.push(format!(
                        "join_token_file {}: cannot read: {error}",
                        path.display()
                    ));
                    None
                }
            },
            (None, None) => None,
        };
        let join_token = token_text.and_then(|text| match text.parse::<JoinToken>() {
            Ok(token) => Some(token),
            Err(error) => {
                problems.push(format!("join token: {error}"));
                None
            }
        });
        let one_second = Duration::from_secs(1);
        let report_interval = parse_duration_field(
            "report_interval",
            &self.report_interval,
            one_second,
            &mut problems,
        );
        let reconnect_initial_backoff = parse_duration_field(
            "reconnect_initial_backoff",
            &self.reconnect_initial_backoff,
            Duration::from_millis(10),
            &mut problems,
        );
        let reconnect_max_backoff = parse_duration_field(
            "reconnect_max_backoff",
            &self.reconnect_max_backoff,
            Duration::from_millis(10),
            &mut problems,
        );
        let metrics_listen = parse_listen_field(
            "metrics_listen",
            self.metrics_listen.as_deref(),
            &mut problems,
        );
        let checks = validate_checks(self.checks, &mut problems);
        let system_interval = parse_duration_field(
            "system.interval",
            &self.system.interval,
            Duration::from_millis(100),
            &mut problems,
        );
        let percent = |field: &str, value: Option<f64>, problems: &mut Vec<String>| {
            if let Some(value) = value {
                if !(0.0..=100.0).contains(&value) {
                    problems.push(format!(
                        "system.{field} = {value} is not a percentage (0 to 100)"
                    ));
                }
            }
        };
        percent(
            "disk_used_percent_max",
            self.system.disk_used_percent_max,
            &mut problems,
        );
        percent(
            "memory_available_percent_min",
            self.system.memory_available_percent_min,
            &mut problems,
        );
        if self.system.load1_max.is_some_and(|load| load < 0.0) {
            problems.push("system.load1_max must not be negative".to_owned());
        }
        if self.system.mounts.iter().any(|mount| !mount.is_absolute()) {
            problems.push("system.mounts must be absolute paths".to_owned());
        }
        let mut release_keys = Vec::new();
        for path in &self.images.release_keys {
            match std::fs::read_to_string(path) {
                Ok(text) => match parse_release_key(&text) {
                    Ok(key) => release_keys.push(key),
                    Err(error) => {
                        problems.push(format!("images.release_keys: {}: {error}", path.display()))
                    }
                },
                Err(error) => problems.push(format!(
                    "images.release_keys: {}: cannot read: {error}",
                    path.display()
                )),
            }
        }
        let verify_deadline = parse_duration_field(
            "images.verify_deadline",
            &self.images.verify_deadline,
            Duration::from_millis(100),
            &mut problems,
        );
        let soak = parse_duration_field(
            "images.soak",
            &self.images.soak,
            Duration::ZERO,
            &mut problems,
        );
        let verify_interval = parse_duration_field(
            "images.verify_interval",
            &self.images.verify_interval,
            Duration::from_secs(1),
            &mut problems,
        );
        let on_drift = match self.images.on_drift.as_str() {
            "report" => crate::image::integrity::OnDrift::Report,
            "restore" => crate::image::integrity::OnDrift::Restore,
            other => {
                let prefix: String = other.chars().take(32).collect();
                problems.push(format!(
                    "images.on_drift = {prefix:?} is not \"report\" or \"restore\""
                ));
                crate::image::integrity::OnDrift::Report
            }
        };
        if self.images.keep < 2 {
            problems.push("images.keep must be at least 2 (current and previous)".to_owned());
        }
        let service = match self.service.mode.as_str() {
            "supervised" => {
                if self.service.command.as_ref().is_some_and(Vec::is_empty) {
                    problems.push("service.command must not be empty".to_owned());
                }
                for (field, name) in [
                    ("service.user", &self.service.user),
                    ("service.group", &self.service.group),
                ] {
                    if let Some(name) = name.as_deref().filter(|name| !is_safe_login(name)) {
                        problems.push(format!(
                            "{field} = {} is not a plain Unix name",
                            flotte_proto::names::quoted_prefix(name)
                        ));
                    }
                }
                ServiceMode::Supervised {
                    command_override: self.service.command.clone(),
                    log_path: self.data_dir.join("service.log"),
                    log_max_bytes: self.service.log_max_bytes.max(4096),
                    run_as: crate::image::service::RunAs {
                        user: self.service.user.clone(),
                        group: self.service.group.clone(),
                    },
                }
            }
            "restart-command" => match &self.service.restart_command {
                Some(command) if !command.is_empty() => {
                    ServiceMode::RestartCommand(command.clone())
                }
                _ => {
                    problems.push(
                        "service.mode = \"restart-command\" needs service.restart_command"
                            .to_owned(),
                    );
                    ServiceMode::Unmanaged
                }
            },
            "none" => ServiceMode::Unmanaged,
            other => {
                problems.push(format!(
                    "service.mode = {other:?} is not supervised, restart-command or none"
                ));
                ServiceMode::Unmanaged
            }
        };
        let hook_timeout = parse_duration_field(
            "quarantine.hook_timeout",
            &self.quarantine.hook_timeout,
            Duration::from_millis(100),
            &mut problems,
        );
        for (name, hook) in [
            ("on_quarantine", &self.quarantine.on_quarantine),
            ("on_release", &self.quarantine.on_release),
        ] {
            if hook.as_ref().is_some_and(Vec::is_empty) {
                problems.push(format!("quarantine.{name} must not be empty"));
            }
        }
        let access = self
            .access
            .as_ref()
            .map(|access| access.validate(&mut problems));
        if reconnect_max_backoff < reconnect_initial_backoff {
            problems.push(
                "reconnect_max_backoff must not be below reconnect_initial_backoff".to_owned(),
            );
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(AgentConfig {
            data_dir: self.data_dir,
            servers: self.servers,
            join_token,
            hostname: self.hostname,
            report_interval,
            reconnect_initial_backoff,
            reconnect_max_backoff,
            metrics_listen,
            checks,
            system: SystemThresholds {
                mounts: self.system.mounts,
                disk_used_percent_max: self.system.disk_used_percent_max,
                memory_available_percent_min: self.system.memory_available_percent_min,
                load1_max: self.system.load1_max,
            },
            system_interval,
            release_keys,
            unpack: UnpackPolicy {
                max_total_bytes: self.images.max_unpacked_bytes,
                allow_setuid: self.images.allow_setuid,
            },
            keep_images: self.images.keep,
            verify_deadline,
            soak,
            integrity: crate::image::integrity::IntegritySettings {
                interval: verify_interval,
                rate_bytes_per_second: self.images.verify_bytes_per_second,
                on_drift,
            },
            keep_drifted_max_bytes: self.images.keep_drifted_max_bytes,
            service,
            quarantine: crate::repair::QuarantineSettings {
                on_quarantine: self.quarantine.on_quarantine,
                on_release: self.quarantine.on_release,
                stop_service: self.quarantine.stop_service,
                hook_timeout,
                omit_command_lines: self.quarantine.omit_command_lines,
            },
            access,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_listed() {
        let file: AgentConfigFile = toml::from_str(
            r#"
            data_dir = ""
            servers = ["nohost", "h:0"]
            join_token = "garbage"
            report_interval = "0s"
            reconnect_initial_backoff = "soon"
            metrics_listen = "nowhere"

            [[check]]
            name = "web"
            kind = "http"
            url = "ftp://x"
            interval = "0s"

            [[check]]
            name = "odd"
            kind = "ping"

            [images]
            verify_interval = "0s"
            on_drift = "fix-it"
            "#,
        )
        .unwrap();
        let error = file.validate().unwrap_err().to_string();
        for expected in [
            "data_dir must not be empty",
            "\"nohost\" is not host:port",
            "\"h:0\" is not host:port",
            "join token: join token is malformed",
            "report_interval = \"0s\" is too short",
            "reconnect_initial_backoff = \"soon\" is not a duration",
            "metrics_listen = \"nowhere\"",
            "check \"web\": URL \"ftp://x\"",
            "check \"web\": interval = \"0s\" is too short",
            "check \"odd\": unknown kind \"ping\"",
            "images.verify_interval = \"0s\" is too short",
            "images.on_drift = \"fix-it\" is not \"report\" or \"restore\"",
        ] {
            assert!(error.contains(expected), "missing {expected:?} in {error}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = toml::from_str::<AgentConfigFile>("data_dir = \"/x\"\nservers = []\nsever = 1")
            .unwrap_err()
            .to_string();
        assert!(error.contains("sever"), "{error}");
    }

    #[test]
    fn defaults_apply() {
        let config = toml::from_str::<AgentConfigFile>("data_dir = \"/x\"\nservers = [\"a:1\"]")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(config.report_interval, Duration::from_secs(10));
        assert!(config.join_token.is_none());
    }
}
