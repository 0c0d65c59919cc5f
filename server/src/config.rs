//! Server settings: a TOML file (`<data-dir>/server.toml` written by `init`,
//! or `--config FILE`) with command-line overrides, parsed once at start and
//! validated with every problem reported together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotte_proto::http::{HttpEndpoint, HttpUrl};
use flotte_proto::identity::{is_valid_segment, SEGMENT_GRAMMAR};
use flotte_proto::names::quoted_prefix;
use flotte_proto::settings::parse_duration_field;
use flotte_proto::settings::parse_listen_field;
pub use flotte_proto::settings::{read_toml, ConfigError};
use serde::{Deserialize, Serialize};

use crate::alert_payloads::WebhookFormat;
use crate::alerts::WebhookTarget;
use crate::audit_key::{AuditConfigFile, AuditSettings};
use crate::domain::repair::settings::{
    validate_minimums, GroupMinimumFile, GroupMinimums, RemediationConfigFile, RemediationSettings,
};
use crate::forensics::{ForensicsConfigFile, ForensicsLimits};
use crate::limits::{LimitSettings, LimitsConfigFile};
pub use crate::store::settings::{StoreConfigFile, StoreKind, StoreSettings};

/// Settings as written in the TOML file. Durations are humantime strings
/// ("24h", "10s") so that every bad value can be reported, not just the first.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfigFile {
    /// Address of the gRPC (mTLS) listener.
    pub listen: String,
    pub trust_domain: String,
    /// The server's own identity name (`spiffe://<td>/server/<name>`); with
    /// several replicas, each one's own name.
    pub server_name: String,
    /// The zone (datacenter) this replica runs in, shown by `status`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// `host:port` agents and operators reach this replica on, shown by
    /// `status` (default: the address the listener is bound to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_address: Option<String>,
    /// DNS names and IP addresses the server certificate is valid for, besides
    /// localhost, 127.0.0.1 and ::1.
    pub subject_alt_names: Vec<String>,
    pub machine_certificate_ttl: String,
    pub report_interval: String,
    /// An agent whose certificate expired less than this long ago may re-enroll
    /// with it; older ones need a new join token.
    pub reenroll_expired_within: String,
    /// How often connected machines' last-seen times are written, in one batch.
    pub last_seen_flush_interval: String,
    /// A machine silent this long is `unreachable` (default: 3 report intervals).
    pub unreachable_after: Option<String>,
    /// A machine running an image built longer ago than this counts as
    /// running an old image (`flottectl status`, a Prometheus gauge);
    /// default 30 days.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_max_age: Option<String>,
    /// How long an operator certificate lasts (default 90 days); flottectl
    /// renews its own once less than a third of it is left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator_certificate_ttl: Option<String>,
    /// Address of the Prometheus `/metrics` HTTP listener (disabled if absent).
    pub metrics_listen: Option<String>,
    /// Webhooks receiving a JSON POST for every state transition.
    #[serde(rename = "webhook", skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookConfigFile>,
    /// Automatic quarantine and replacement, behind a breaker. Left out of
    /// the file `init` writes while it is the default, so that a `[remediation]`
    /// table appended later is the only one.
    #[serde(skip_serializing_if = "RemediationConfigFile::is_default")]
    pub remediation: RemediationConfigFile,
    /// Least operational machines per group, for `flottectl dr impact`.
    #[serde(rename = "minimum", skip_serializing_if = "Vec::is_empty")]
    pub minimums: Vec<GroupMinimumFile>,
    /// Bounds on what unauthenticated callers can make the server hold.
    /// Left out of the file `init` writes while it is the default.
    #[serde(skip_serializing_if = "LimitsConfigFile::is_default")]
    pub limits: LimitsConfigFile,
    /// Bounds on the forensic bundles machines upload. Left out of the file
    /// `init` writes while it is the default.
    #[serde(skip_serializing_if = "ForensicsConfigFile::is_default")]
    pub forensics: ForensicsConfigFile,
    /// Where the state lives: SQLite in the data dir (the default, left out
    /// of the file `init` writes) or a PostgreSQL database shared by replicas.
    #[serde(skip_serializing_if = "StoreConfigFile::is_default")]
    pub store: StoreConfigFile,
    /// How often the audit chain's head is signed. Left out of the file
    /// `init` writes while it is the default.
    #[serde(skip_serializing_if = "AuditConfigFile::is_default")]
    pub audit: AuditConfigFile,
}

/// One `[[webhook]]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfigFile {
    /// `http://` or `https://host[:port]/path`. Redirects are not followed.
    pub url: String,
    /// PEM file of the CA certificates an `https://` receiver is checked
    /// against, instead of the system's store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// What the body looks like: "generic" (the alert's own JSON, the
    /// default), "slack" (`text` + `blocks`) or "alertmanager" (the array
    /// Alertmanager's `POST /api/v2/alerts` accepts).
    #[serde(default = "default_webhook_format")]
    pub format: String,
    /// Alertmanager's `generatorURL`: where a person goes from the alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator_url: Option<String>,
    /// Covers connecting, TLS, the request and the answer.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: String,
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
}

fn default_webhook_format() -> String {
    "generic".into()
}
fn default_webhook_timeout() -> String {
    "5s".into()
}
fn default_webhook_attempts() -> u32 {
    5
}

impl Default for ServerConfigFile {
    fn default() -> Self {
        ServerConfigFile {
            listen: "127.0.0.1:7443".into(),
            trust_domain: "flotte.local".into(),
            server_name: "flotte-server".into(),
            zone: String::new(),
            advertise_address: None,
            subject_alt_names: Vec::new(),
            machine_certificate_ttl: "24h".into(),
            report_interval: "10s".into(),
            reenroll_expired_within: "30days".into(),
            last_seen_flush_interval: "30s".into(),
            unreachable_after: None,
            image_max_age: None,
            operator_certificate_ttl: None,
            metrics_listen: None,
            webhooks: Vec::new(),
            remediation: RemediationConfigFile::default(),
            minimums: Vec::new(),
            limits: LimitsConfigFile::default(),
            forensics: ForensicsConfigFile::default(),
            store: StoreConfigFile::default(),
            audit: AuditConfigFile::default(),
        }
    }
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: String,
    pub server_name: String,
    pub zone: String,
    pub advertise_address: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub machine_certificate_ttl: Duration,
    pub report_interval: Duration,
    pub reenroll_expired_within: Duration,
    pub last_seen_flush_interval: Duration,
    pub unreachable_after: Duration,
    pub image_max_age: Duration,
    pub operator_certificate_ttl: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub webhooks: Vec<WebhookTarget>,
    pub remediation: RemediationSettings,
    pub minimums: GroupMinimums,
    pub limits: LimitSettings,
    pub forensics: ForensicsLimits,
    pub store: StoreSettings,
    pub audit: AuditSettings,
}

impl ServerConfigFile {
    pub fn validate(self, data_dir: PathBuf) -> Result<ServerConfig, ConfigError> {
        let mut problems = Vec::new();
        let listen = match self.listen.parse::<SocketAddr>() {
            Ok(address) => address,
            Err(_) => {
                problems.push(format!(
                    "listen = {:?} is not an IP:port socket address",
                    self.listen
                ));
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        };
        if !is_valid_segment(&self.trust_domain) {
            problems.push(format!(
                "trust_domain = {} {SEGMENT_GRAMMAR}",
                quoted_prefix(&self.trust_domain)
            ));
        }
        if !is_valid_segment(&self.server_name) {
            problems.push(format!(
                "server_name = {} {SEGMENT_GRAMMAR}",
                quoted_prefix(&self.server_name)
            ));
        }
        if !self.zone.is_empty() && !is_valid_segment(&self.zone) {
            problems.push(format!(
                "zone = {} {SEGMENT_GRAMMAR}",
                quoted_prefix(&self.zone)
            ));
        }
        if let Some(address) = &self.advertise_address {
            let valid = address.len() <= 255
                && address
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                problems.push(format!(
                    "advertise_address = {} is not host:port",
                    quoted_prefix(address)
                ));
            }
        }
        for name in &self.subject_alt_names {
            let valid_dns = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*'));
            if name.parse::<std::net::IpAddr>().is_err() && !valid_dns {
                problems.push(format!(
                    "subject_alt_names: {name:?} is neither a DNS name nor an IP address"
                ));
            }
        }
        let one_second = Duration::from_secs(1);
        let machine_certificate_ttl = parse_duration_field(
            "machine_certificate_ttl",
            &self.machine_certificate_ttl,
            one_second,
            &mut problems,
        );
        let report_interval = parse_duration_field(
            "report_interval",
            &self.report_interval,
            one_second,
            &mut problems,
        );
        let reenroll_expired_within = parse_duration_field(
            "reenroll_expired_within",
            &self.reenroll_expired_within,
            Duration::ZERO,
            &mut problems,
        );
        let last_seen_flush_interval = parse_duration_field(
            "last_seen_flush_interval",
            &self.last_seen_flush_interval,
            one_second,
            &mut problems,
        );
        let unreachable_after = match &self.unreachable_after {
            Some(text) => {
                parse_duration_field("unreachable_after", text, one_second, &mut problems)
            }
            None => report_interval * 3,
        };
        if unreachable_after <= report_interval {
            problems.push(format!(
                "unreachable_after ({}) must be longer than report_interval ({})",
                humantime::format_duration(unreachable_after),
                humantime::format_duration(report_interval)
            ));
        }
        let image_max_age = parse_duration_field(
            "image_max_age",
            self.image_max_age.as_deref().unwrap_or("30days"),
            one_second,
            &mut problems,
        );
        let operator_certificate_ttl = parse_duration_field(
            "operator_certificate_ttl",
            self.operator_certificate_ttl.as_deref().unwrap_or("90days"),
            one_second,
            &mut problems,
        );
        let metrics_listen = parse_listen_field(
            "metrics_listen",
            self.metrics_listen.as_deref(),
            &mut problems,
        );
        let webhooks = validate_webhooks(&self.webhooks, &mut problems);
        let remediation = self.remediation.validate(&mut problems);
        let minimums = validate_minimums(&self.minimums, &mut problems);
        let limits = self.limits.validate(&mut problems);
        let forensics = self.forensics.validate(&mut problems);
        let store = self.store.validate(&data_dir, &mut problems);
        let audit = self.audit.validate(&mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        let mut subject_alt_names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        for name in self.subject_alt_names {
            if !subject_alt_names.contains(&name) {
                subject_alt_names.push(name);
            }
        }
        Ok(ServerConfig {
            data_dir,
            listen,
            trust_domain: self.trust_domain,
            server_name: self.server_name,
            zone: self.zone,
            advertise_address: self.advertise_address,
            subject_alt_names,
            machine_certificate_ttl,
            report_interval,
            reenroll_expired_within,
            last_seen_flush_interval,
            unreachable_after,
            image_max_age,
            operator_certificate_ttl,
            metrics_listen,
            webhooks,
            remediation,
            minimums,
            limits,
            forensics,
            store,
            audit,
        })
    }
}

/// Validates every `[[webhook]]`, naming each by its position and its URL
/// without the query (where receivers' tokens usually are).
fn validate_webhooks(
    webhooks: &[WebhookConfigFile],
    problems: &mut Vec<String>,
) -> Vec<WebhookTarget> {
    let mut targets = Vec::new();
    for (index, webhook) in webhooks.iter().enumerate() {
        let shown =
            HttpUrl::parse(&webhook.url).map_or_else(|_| String::new(), |url| format!(" ({url})"));
        let name = format!("webhook {}{shown}", index + 1);
        let timeout = parse_duration_field(
            &format!("{name}: timeout"),
            &webhook.timeout,
            Duration::from_millis(100),
            problems,
        );
        if webhook.max_attempts == 0 {
            problems.push(format!("{name}: max_attempts must be at least 1"));
        }
        let format = WebhookFormat::parse(&webhook.format);
        if format.is_none() {
            problems.push(format!(
                "{name}: format = {} is not {}",
                quoted_prefix(&webhook.format),
                WebhookFormat::NAMES
            ));
        }
        if let Some(generator_url) = &webhook.generator_url {
            if let Err(error) = HttpUrl::parse(generator_url) {
                problems.push(format!("{name}: generator_url: {error}"));
            }
        }
        match HttpEndpoint::from_settings(&webhook.url, webhook.ca_file.as_deref()) {
            Ok(endpoint) => targets.push(WebhookTarget {
                endpoint,
                format: format.unwrap_or_default(),
                generator_url: webhook.generator_url.clone(),
                timeout,
                max_attempts: webhook.max_attempts.max(1),
            }),
            Err(error) => problems.push(format!("{name}: {error}")),
        }
    }
    targets
}

/// Where `init` writes, and `run` reads by default, the server settings.
pub fn default_config_path(data_dir: &Path) -> PathBuf {
    data_dir.join("server.toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_together() {
        let file = ServerConfigFile {
            listen: "nowhere".into(),
            trust_domain: "bad/domain".into(),
            machine_certificate_ttl: "soon".into(),
            report_interval: "0s".into(),
            subject_alt_names: vec!["bad name".into()],
            metrics_listen: Some("everywhere".into()),
            webhooks: vec![
                WebhookConfigFile {
                    url: "ftp://x/".into(),
                    ca_file: None,
                    format: "pagerduty".into(),
                    generator_url: Some("not a url".into()),
                    timeout: "1s".into(),
                    max_attempts: 0,
                },
                WebhookConfigFile {
                    url: "http://hooks.example/in?token=s3cret".into(),
                    ca_file: Some(PathBuf::from("/etc/ssl/certs/ca-certificates.crt")),
                    format: "slack".into(),
                    generator_url: None,
                    timeout: "5s".into(),
                    max_attempts: 3,
                },
            ],
            remediation: RemediationConfigFile {
                max_concurrent: 0,
                ..RemediationConfigFile::default()
            },
            limits: LimitsConfigFile {
                max_requests_per_connection: 0,
                ..LimitsConfigFile::default()
            },
            forensics: ForensicsConfigFile {
                max_bundle_bytes: 2048,
                machine_quota_bytes: 1024,
            },
            ..ServerConfigFile::default()
        };
        let error = file
            .validate(PathBuf::from("/tmp"))
            .unwrap_err()
            .to_string();
        for expected in [
            "listen = \"nowhere\"",
            "trust_domain",
            "machine_certificate_ttl = \"soon\"",
            "report_interval = \"0s\" is too short",
            "\"bad name\"",
            "metrics_listen = \"everywhere\"",
            "webhook 1: max_attempts must be at least 1",
            "webhook 1: URL \"ftp://x/\" is not http(s)://",
            "webhook 2 (http://hooks.example/in?…): ca_file is set but",
            "webhook 1: format = \"pagerduty\" is not generic, slack or alertmanager",
            "webhook 1: generator_url: URL \"not a url\"",
            "remediation.max_concurrent must be at least 1",
            "limits.max_requests_per_connection must be at least 1",
            "forensics.machine_quota_bytes (1024) must be at least forensics.max_bundle_bytes (2048)",
        ] {
            assert!(error.contains(expected), "{expected} missing from {error}");
        }
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = toml::from_str::<ServerConfigFile>("listn = \"x\"").unwrap_err();
        assert!(error.to_string().contains("listn"), "{error}");
    }

    #[test]
    fn defaults_are_valid_and_include_loopback_names() {
        let config = ServerConfigFile::default()
            .validate(PathBuf::from("/tmp"))
            .unwrap();
        assert!(config.subject_alt_names.contains(&"127.0.0.1".to_owned()));
        assert_eq!(
            config.machine_certificate_ttl,
            Duration::from_secs(24 * 3600)
        );
    }
}
