//! Process resource limits the server needs at fleet scale. Every connected
//! agent holds one socket (one file descriptor) open for as long as its
//! session lives, so 10 000 agents need more than the usual default soft
//! limit of 1 024 open files. Linux lets an unprivileged process raise its
//! soft limit up to its hard limit; this module does exactly that at start
//! and reports what it got, so an operator sees the ceiling in the log
//! instead of discovering it as "accept failed: too many open files".

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
}
