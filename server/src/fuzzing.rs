//! The narrowest entry points the fuzz targets in `fuzz/` need into parsers
//! that are otherwise private (the rollout plan lives in `domain`). Not an
//! API: hidden from the docs, answers only "accepted" or the problems.
//! Nothing here may do I/O.

use std::path::PathBuf;

/// Parses and validates a rollout plan file, as `rollout create` does.
pub fn parse_plan(text: &str) -> Result<(), String> {
    crate::domain::rollout::plan::parse_plan(text)
        .map(|_| ())
        .map_err(|error| error.to_string())
}

/// Parses and validates a `server.toml`, as `run` does (the data dir named
/// is never read by validation).
pub fn validate_server_settings(text: &str) -> Result<(), String> {
    let file: crate::config::ServerConfigFile =
        toml::from_str(text).map_err(|error| error.to_string())?;
    file.validate(PathBuf::from("/nonexistent/flotte-fuzz"))
        .map(|_| ())
        .map_err(|error| error.to_string())
}
