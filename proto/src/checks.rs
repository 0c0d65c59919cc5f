//! Health check definitions as people write them: shared by the agent config
//! and image manifests, so an image can declare the checks that gate its own
//! commit. Validation lives with the agent, which runs them.

use serde::{Deserialize, Serialize};

/// One health check as written in an agent config (`[[check]]`) or an
/// image manifest (`checks`). The agent validates it (see `flotte_agent::health`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CheckDefinition {
    pub name: String,
    /// "http", "tcp" or "exec".
    pub kind: String,
    #[serde(default)]
    pub url: Option<String>,
    /// For an `https://` url: a PEM file of the CA certificates to check the
    /// endpoint against instead of the system's store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub expected_status: Option<u16>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default = "default_interval")]
    pub interval: String,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
    #[serde(default = "default_critical")]
    pub critical: bool,
}

fn default_interval() -> String {
    "10s".into()
}
fn default_timeout() -> String {
    "5s".into()
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_critical() -> bool {
    true
}
