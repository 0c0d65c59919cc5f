//! The C allocator's settings for the long-running server process, applied
//! once by `flotte-server run` before its async runtime starts a thread.
//!
//! Why: glibc's malloc gives threads arenas of their own, up to eight per
//! core. The server's store calls run on tokio's blocking pool, whose
//! threads come and go and allocate (SQLite's page cache, rows, the
//! messages built from them) from whichever arena they were handed; memory
//! freed in one arena is never reused by another, so the resident size
//! climbs in steps long after the live heap has stopped growing. The soak
//! (BENCHMARKS.md, issue 17) measured it: the live heap flat under
//! `heaptrack` while the resident size rose after every 1 000-machine
//! rollout. Two arenas keep the main thread and the pools from contending
//! on one lock while leaving few places for free memory to strand.
//!
//! What must never live here: anything but process-wide allocator settings,
//! or a setting applied after threads have started allocating.

use std::ffi::OsStr;

/// How many malloc arenas the server's process may use.
pub const MALLOC_ARENAS: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    #[error("the C library refused to limit malloc to {0} arenas (mallopt M_ARENA_MAX)")]
    ArenaLimitRefused(i32),
}

/// What [`limit_malloc_arenas`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArenaLimit {
    /// The process now uses at most this many arenas.
    Applied(i32),
    /// The operator chose a limit through glibc's own environment
    /// variables, which glibc has already applied: theirs stands.
    LeftToTheOperator,
}

/// The limit to apply, given glibc's environment variables: none when the
/// operator set `MALLOC_ARENA_MAX`, or `glibc.malloc.arena_max` in
/// `GLIBC_TUNABLES`.
fn arena_limit_to_apply(
    malloc_arena_max: Option<&OsStr>,
    glibc_tunables: Option<&OsStr>,
) -> Option<i32> {
    let tunables_set_it = glibc_tunables.is_some_and(|tunables| {
        tunables
            .to_string_lossy()
            .contains("glibc.malloc.arena_max")
    });
    if malloc_arena_max.is_some() || tunables_set_it {
        None
    } else {
        Some(MALLOC_ARENAS)
    }
}

/// Limits malloc to [`MALLOC_ARENAS`] arenas unless the operator chose a
/// limit. Call before any thread starts: arenas made before stay in use.
pub fn limit_malloc_arenas() -> Result<ArenaLimit, AllocatorError> {
    let Some(arenas) = arena_limit_to_apply(
        std::env::var_os("MALLOC_ARENA_MAX").as_deref(),
        std::env::var_os("GLIBC_TUNABLES").as_deref(),
    ) else {
        return Ok(ArenaLimit::LeftToTheOperator);
    };
    set_arena_max(arenas)?;
    Ok(ArenaLimit::Applied(arenas))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_arena_max(arenas: i32) -> Result<(), AllocatorError> {
    // SAFETY: mallopt(3) takes two integers by value and only changes a
    // parameter inside glibc's malloc, which is MT-safe; it reads or writes
    // no memory of ours. M_ARENA_MAX is the parameter glibc documents for
    // this.
    let accepted = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    if accepted == 1 {
        Ok(())
    } else {
        Err(AllocatorError::ArenaLimitRefused(arenas))
    }
}

/// Other C libraries (musl) have no per-thread arenas to limit.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_arenas: i32) -> Result<(), AllocatorError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_applies_unless_the_operator_set_one() {
        assert_eq!(arena_limit_to_apply(None, None), Some(MALLOC_ARENAS));
        assert_eq!(
            arena_limit_to_apply(None, Some(OsStr::new("glibc.malloc.tcache_count=0"))),
            Some(MALLOC_ARENAS)
        );
        assert_eq!(arena_limit_to_apply(Some(OsStr::new("4")), None), None);
        assert_eq!(
            arena_limit_to_apply(
                None,
                Some(OsStr::new(
                    "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=8"
                ))
            ),
            None
        );
    }

    #[test]
    fn the_c_library_accepts_the_arena_limit() {
        set_arena_max(MALLOC_ARENAS).expect("mallopt accepts M_ARENA_MAX");
    }
}
