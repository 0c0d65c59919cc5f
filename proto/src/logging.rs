//! How `flotte-server run` and `flotte-agent run` log: `RUST_LOG` filters
//! (default `info`), to stderr, as text for people (coloured on a terminal
//! only) or, with `--log-format json`, one JSON object per line for log
//! collectors. The JSON fields are tracing-subscriber's: `timestamp`
//! (RFC 3339), `level`, `target`, `fields` (`message` and the event's own
//! fields, e.g. `machine`, `server`, `error`) and `span`/`spans` when inside
//! one; they are documented in `docs/logs.md` and kept stable.

use std::str::FromStr;

/// The log line format chosen with `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "{:?}: expected text or json",
                other.chars().take(32).collect::<String>()
            )),
        }
    }
}

/// Installs the process's logger (once, at start).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        // Colour only for people: the journal would keep raw escape codes.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_anything_else_is_named() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        let refused = "xml".parse::<LogFormat>().unwrap_err();
        assert!(refused.contains("expected text or json"), "{refused}");
    }
}
