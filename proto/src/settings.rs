//! Helpers for validating settings files so that every problem is collected
//! and reported together: each parser pushes a sentence naming the field and
//! returns a placeholder, instead of stopping at the first error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a settings file was refused; `Invalid` lists every problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n{}", .0.iter().map(|problem| format!("  - {problem}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

/// Reads a TOML file into `T`, naming the file and the offending key on error.
pub fn read_toml<T: for<'de> serde::Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| ConfigError::Parse {
        path: path.to_owned(),
        message: error.to_string(),
    })
}

/// Parses a humantime duration (`"10s"`, `"24h"`) no shorter than `minimum`.
pub fn parse_duration_field(
    field: &str,
    text: &str,
    minimum: Duration,
    problems: &mut Vec<String>,
) -> Duration {
    match humantime::parse_duration(text) {
        Ok(duration) if duration >= minimum => duration,
        Ok(_) => {
            problems.push(format!(
                "{field} = {text:?} is too short (minimum {})",
                humantime::format_duration(minimum)
            ));
            minimum
        }
        Err(error) => {
            problems.push(format!("{field} = {text:?} is not a duration: {error}"));
            minimum
        }
    }
}

/// Parses an optional `IP:port` listen address.
pub fn parse_listen_field(
    field: &str,
    text: Option<&str>,
    problems: &mut Vec<String>,
) -> Option<SocketAddr> {
    let text = text?;
    match text.parse() {
        Ok(address) => Some(address),
        Err(_) => {
            problems.push(format!(
                "{field} = {text:?} is not an IP:port socket address"
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_the_field_and_value() {
        let mut problems = Vec::new();
        assert_eq!(
            parse_duration_field("a", "2s", Duration::from_secs(1), &mut problems),
            Duration::from_secs(2)
        );
        parse_duration_field("b", "0s", Duration::from_secs(1), &mut problems);
        parse_duration_field("c", "soon", Duration::ZERO, &mut problems);
        assert_eq!(parse_listen_field("d", None, &mut problems), None);
        assert!(parse_listen_field("e", Some("127.0.0.1:0"), &mut problems).is_some());
        parse_listen_field("f", Some("nowhere"), &mut problems);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("b = \"0s\" is too short"));
        assert!(problems[1].starts_with("c = \"soon\" is not a duration"));
        assert!(problems[2].starts_with("f = \"nowhere\""));
    }
}
