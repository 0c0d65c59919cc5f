//! Limits that keep the server bounded: the process's open-files limit, and
//! the `[limits]` settings for everything anyone can send before they have
//! authenticated (connections, handshakes, HTTP/2 streams, headers, message
//! sizes, unary call time, enrollment rate).
//!
//! Every connected agent holds one socket (one file descriptor) open for as
//! long as its session lives, so 10 000 agents need more than the usual
//! default soft limit of 1 024 open files. Linux lets an unprivileged process
//! raise its soft limit up to its hard limit; this module does exactly that at
//! start and reports what it got, so an operator sees the ceiling in the log
//! instead of discovering it as "accept failed: too many open files".
//!
//! The limiters themselves live in `rate` (enrollment token buckets,
//! per-source connection counts) and `methods` (the known gRPC methods and
//! the unary call timeout); the TLS accept loop (`tls`) applies the
//! connection limits. Nothing here authorises anybody.

pub mod rate;

use std::time::Duration;

use flotte_proto::settings::parse_duration_field;
use serde::{Deserialize, Serialize};

use self::rate::Rate;
use nix::sys::resource::{getrlimit, rlim_t, setrlimit, Resource};

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("cannot read the open-files limit (RLIMIT_NOFILE): {0}")]
    Read(nix::Error),
    #[error(
        "cannot raise the open-files soft limit from {soft} to the hard limit {hard}: {source}"
    )]
    Raise {
        soft: rlim_t,
        hard: rlim_t,
        source: nix::Error,
    },
}

/// The open-files limit after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit before the call.
    pub previous_soft: rlim_t,
    /// The soft limit now in force: what bounds the number of connections.
    pub soft: rlim_t,
    pub hard: rlim_t,
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit (the most
/// an unprivileged process may take) and returns the limits now in force.
/// Does nothing when the soft limit is already at the hard limit.
pub fn raise_open_files_limit() -> Result<OpenFilesLimit, LimitsError> {
    let (previous_soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(LimitsError::Read)?;
    if previous_soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|source| LimitsError::Raise {
            soft: previous_soft,
            hard,
            source,
        })?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(LimitsError::Read)?;
    Ok(OpenFilesLimit {
        previous_soft,
        soft,
        hard,
    })
}

/// Largest `Enroll`/`Reenroll` message ever accepted: a CSR, a join token, a
/// hostname or an expired certificate fit in a few KiB.
pub const MAX_ENROLLMENT_MESSAGE_BYTES: u32 = 64 * 1024;
/// Smallest header list limit accepted: a real call's path and metadata.
const MIN_HEADER_LIST_BYTES: u32 = 1024;

/// The `[limits]` table of `server.toml`. Every limit here applies before the
/// caller is authenticated, so its default is safe for a server on an open
/// network; raise them for a load test from one host.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfigFile {
    /// HTTP/2 streams open at once on one connection.
    pub max_streams_per_connection: u32,
    /// Requests being handled at once on one connection (until their
    /// response headers; streams then run on without holding a place).
    pub max_requests_per_connection: u32,
    /// A unary call not answered within this long gets `DEADLINE_EXCEEDED`
    /// (streams — sessions, watches, pushes, downloads — are not bounded).
    pub unary_call_timeout: String,
    /// Largest HTTP/2 header list (path and metadata) of a request.
    pub max_header_list_bytes: u32,
    /// Largest message of `Enroll`/`Reenroll` (at most 64 KiB).
    pub max_enrollment_message_bytes: u32,
    /// Largest message an agent sends on its session and uploads.
    pub max_agent_message_bytes: u32,
    /// Largest message of an admin call (flottectl, integrations).
    pub max_admin_message_bytes: u32,
    /// TLS handshakes in progress at once; beyond this, accepting pauses.
    pub max_handshakes_in_flight: u32,
    /// A TLS handshake not finished within this long is dropped.
    pub handshake_timeout: String,
    /// Open connections without a client certificate (enrolling machines,
    /// health probes); beyond this, new ones are closed after the handshake.
    pub max_anonymous_connections: u32,
    /// A connection without a client certificate that sends nothing for this
    /// long is closed.
    pub anonymous_idle_timeout: String,
    /// Connections from one source address that are still handshaking or
    /// have no client certificate.
    pub max_unauthenticated_connections_per_source: u32,
    /// `Enroll`/`Reenroll` calls per second for the whole server, and the
    /// burst allowed above that rate.
    pub enroll_per_second: u32,
    pub enroll_burst: u32,
    /// The same, for one source address.
    pub enroll_per_second_per_source: u32,
    pub enroll_burst_per_source: u32,
}

impl Default for LimitsConfigFile {
    fn default() -> Self {
        LimitsConfigFile {
            max_streams_per_connection: 128,
            max_requests_per_connection: 64,
            unary_call_timeout: "30s".into(),
            max_header_list_bytes: 16 * 1024,
            max_enrollment_message_bytes: MAX_ENROLLMENT_MESSAGE_BYTES,
            max_agent_message_bytes: 1024 * 1024,
            max_admin_message_bytes: 4 * 1024 * 1024,
            max_handshakes_in_flight: 256,
            handshake_timeout: "10s".into(),
            max_anonymous_connections: 1024,
            anonymous_idle_timeout: "30s".into(),
            max_unauthenticated_connections_per_source: 64,
            enroll_per_second: 50,
            enroll_burst: 200,
            enroll_per_second_per_source: 5,
            enroll_burst_per_source: 20,
        }
    }
}

/// Validated `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSettings {
    pub max_streams_per_connection: u32,
    pub max_requests_per_connection: usize,
    pub unary_call_timeout: Duration,
    pub max_header_list_bytes: u32,
    pub max_enrollment_message_bytes: usize,
    pub max_agent_message_bytes: usize,
    pub max_admin_message_bytes: usize,
    pub max_handshakes_in_flight: usize,
    pub handshake_timeout: Duration,
    pub max_anonymous_connections: usize,
    pub anonymous_idle_timeout: Duration,
    pub max_unauthenticated_connections_per_source: u32,
    pub enroll_rate: Rate,
    pub enroll_rate_per_source: Rate,
}

/// A `u32` setting at least 1 (and at most `maximum`, when given).
fn bounded_count(field: &str, value: u32, maximum: Option<u32>, problems: &mut Vec<String>) -> u32 {
    if value == 0 {
        problems.push(format!("limits.{field} must be at least 1"));
        return 1;
    }
    match maximum {
        Some(maximum) if value > maximum => {
            problems.push(format!(
                "limits.{field} = {value} is over the maximum {maximum}"
            ));
            maximum
        }
        _ => value,
    }
}

fn count_as_usize(value: u32) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

impl LimitsConfigFile {
    pub fn is_default(&self) -> bool {
        *self == LimitsConfigFile::default()
    }

    /// Checks every limit, pushing one sentence per problem.
    pub fn validate(&self, problems: &mut Vec<String>) -> LimitSettings {
        let max_header_list_bytes = bounded_count(
            "max_header_list_bytes",
            self.max_header_list_bytes,
            None,
            problems,
        );
        // HTTP/2 needs room for the path and the gRPC headers of a real call.
        if max_header_list_bytes < MIN_HEADER_LIST_BYTES {
            problems.push(format!(
                "limits.max_header_list_bytes = {max_header_list_bytes} is under the minimum {MIN_HEADER_LIST_BYTES}"
            ));
        }
        LimitSettings {
            max_streams_per_connection: bounded_count(
                "max_streams_per_connection",
                self.max_streams_per_connection,
                None,
                problems,
            ),
            max_requests_per_connection: count_as_usize(bounded_count(
                "max_requests_per_connection",
                self.max_requests_per_connection,
                None,
                problems,
            )),
            unary_call_timeout: parse_duration_field(
                "limits.unary_call_timeout",
                &self.unary_call_timeout,
                Duration::from_millis(100),
                problems,
            ),
            max_header_list_bytes,
            max_enrollment_message_bytes: count_as_usize(bounded_count(
                "max_enrollment_message_bytes",
                self.max_enrollment_message_bytes,
                Some(MAX_ENROLLMENT_MESSAGE_BYTES),
                problems,
            )),
            max_agent_message_bytes: count_as_usize(bounded_count(
                "max_agent_message_bytes",
                self.max_agent_message_bytes,
                None,
                problems,
            )),
            max_admin_message_bytes: count_as_usize(bounded_count(
                "max_admin_message_bytes",
                self.max_admin_message_bytes,
                None,
                problems,
            )),
            max_handshakes_in_flight: count_as_usize(bounded_count(
                "max_handshakes_in_flight",
                self.max_handshakes_in_flight,
                None,
                problems,
            )),
            handshake_timeout: parse_duration_field(
                "limits.handshake_timeout",
                &self.handshake_timeout,
                Duration::from_millis(100),
                problems,
            ),
            max_anonymous_connections: count_as_usize(bounded_count(
                "max_anonymous_connections",
                self.max_anonymous_connections,
                None,
                problems,
            )),
            anonymous_idle_timeout: parse_duration_field(
                "limits.anonymous_idle_timeout",
                &self.anonymous_idle_timeout,
                Duration::from_millis(100),
                problems,
            ),
            max_unauthenticated_connections_per_source: bounded_count(
                "max_unauthenticated_connections_per_source",
                self.max_unauthenticated_connections_per_source,
                None,
                problems,
            ),
            enroll_rate: Rate {
                per_second: bounded_count(
                    "enroll_per_second",
                    self.enroll_per_second,
                    None,
                    problems,
                ),
                burst: bounded_count("enroll_burst", self.enroll_burst, None, problems),
            },
            enroll_rate_per_source: Rate {
                per_second: bounded_count(
                    "enroll_per_second_per_source",
                    self.enroll_per_second_per_source,
                    None,
                    problems,
                ),
                burst: bounded_count(
                    "enroll_burst_per_source",
                    self.enroll_burst_per_source,
                    None,
                    problems,
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let limit = raise_open_files_limit().unwrap();
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.soft >= limit.previous_soft);
        // Idempotent: a second call finds nothing to raise.
        assert_eq!(raise_open_files_limit().unwrap().soft, limit.soft);
    }

    #[test]
    fn default_limits_are_valid() {
        let mut problems = Vec::new();
        let settings = LimitsConfigFile::default().validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(settings.max_enrollment_message_bytes, 64 * 1024);
        assert_eq!(settings.unary_call_timeout, Duration::from_secs(30));
    }

    #[test]
    fn every_bad_limit_is_reported() {
        let file = LimitsConfigFile {
            max_streams_per_connection: 0,
            max_enrollment_message_bytes: 1024 * 1024,
            max_header_list_bytes: 10,
            handshake_timeout: "soon".into(),
            enroll_burst_per_source: 0,
            ..LimitsConfigFile::default()
        };
        let mut problems = Vec::new();
        let settings = file.validate(&mut problems);
        let text = problems.join("\n");
        for expected in [
            "limits.max_streams_per_connection must be at least 1",
            "limits.max_enrollment_message_bytes = 1048576 is over the maximum 65536",
            "limits.max_header_list_bytes = 10 is under the minimum 1024",
            "limits.handshake_timeout = \"soon\" is not a duration",
            "limits.enroll_burst_per_source must be at least 1",
        ] {
            assert!(text.contains(expected), "{expected} missing from {text}");
        }
        assert_eq!(problems.len(), 5, "{text}");
        // The placeholder never exceeds the hard maximum.
        assert_eq!(settings.max_enrollment_message_bytes, 64 * 1024);
    }

    #[test]
    fn unknown_limit_keys_are_refused() {
        let error = toml::from_str::<LimitsConfigFile>("max_stream = 4").unwrap_err();
        assert!(error.to_string().contains("max_stream"), "{error}");
    }
}
