//! The C allocator's settings for the long-running server process, applied
//! once by `flotte-server run` before its async runtime starts a thread.
//!
//! Why: the soak (BENCHMARKS.md, issue 17) showed the resident size of a
//! server rising for an hour while its live heap, under `heaptrack`, stayed
//! flat: glibc's malloc kept freed memory it could not give back. Two
//! settings remove the largest causes (a slower creep remains, measured in
//! BENCHMARKS.md's soak):
//! * **Two arenas.** glibc gives threads arenas of their own, up to eight
//!   per core. The store's calls run on tokio's blocking pool, whose threads
//!   come and go and allocate from whichever arena they were handed; memory
//!   freed in one arena is never reused by another. Two keep the main
//!   thread and the pools from contending on one lock while leaving few
//!   places for free memory to strand.
//! * **A fixed mmap threshold of 128 KiB.** By default glibc raises the
//!   threshold to the size of every large block freed (up to 32 MiB), so
//!   that a pass's rollout copy or a big fan-out's buffers, once freed,
//!   are allocated inside the heap the next time and leave holes there
//!   that are never returned. Fixed, blocks of 128 KiB and more are mapped
//!   on their own and given back whole when freed.
//!
//! What must never live here: anything but process-wide allocator settings,
//! or a setting applied after threads have started allocating.

use std::ffi::OsStr;

#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    #[error("the C library refused to set malloc's {name} to {value} (mallopt)")]
    Refused { name: &'static str, value: i32 },
}

/// One malloc parameter the server sets unless the operator chose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MallocParameter {
    /// Its name in glibc's tunables (`GLIBC_TUNABLES=glibc.malloc.…`).
    pub tunable: &'static str,
    /// glibc's own environment variable for it.
    pub environment: &'static str,
    /// The value the server sets.
    pub value: i32,
    /// mallopt(3)'s parameter number (glibc's `M_…`).
    option: i32,
}

/// What the server sets, in the order it sets them.
pub const MALLOC_PARAMETERS: [MallocParameter; 2] = [
    MallocParameter {
        tunable: "glibc.malloc.arena_max",
        environment: "MALLOC_ARENA_MAX",
        value: 2,
        option: M_ARENA_MAX,
    },
    MallocParameter {
        tunable: "glibc.malloc.mmap_threshold",
        environment: "MALLOC_MMAP_THRESHOLD_",
        value: 128 * 1024,
        option: M_MMAP_THRESHOLD,
    },
];

#[cfg(all(target_os = "linux", target_env = "gnu"))]
const M_ARENA_MAX: i32 = libc::M_ARENA_MAX;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const M_MMAP_THRESHOLD: i32 = libc::M_MMAP_THRESHOLD;
// Other C libraries (musl) have neither per-thread arenas nor a moving
// threshold: nothing is set there.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
const M_ARENA_MAX: i32 = 0;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
const M_MMAP_THRESHOLD: i32 = 0;

/// What [`tune_malloc`] did with one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuned {
    /// Set to this value.
    Set(i32),
    /// The operator chose it through glibc's own environment variables,
    /// which glibc has already applied: theirs stands.
    LeftToTheOperator,
}

/// Whether the operator set `parameter`, given glibc's environment
/// variables: its own variable, or its name in `GLIBC_TUNABLES`.
fn chosen_by_the_operator(
    parameter: &MallocParameter,
    own_variable: Option<&OsStr>,
    glibc_tunables: Option<&OsStr>,
) -> bool {
    own_variable.is_some()
        || glibc_tunables.is_some_and(|tunables| {
            tunables
                .to_string_lossy()
                .split(':')
                .any(|setting| setting.split('=').next() == Some(parameter.tunable))
        })
}

/// Sets each of [`MALLOC_PARAMETERS`] the operator did not choose; each
/// parameter's outcome, in order. Call before any thread starts: arenas
/// made before stay in use.
pub fn tune_malloc() -> Vec<(MallocParameter, Result<Tuned, AllocatorError>)> {
    let glibc_tunables = std::env::var_os("GLIBC_TUNABLES");
    MALLOC_PARAMETERS
        .iter()
        .map(|parameter| {
            let own_variable = std::env::var_os(parameter.environment);
            let outcome = if chosen_by_the_operator(
                parameter,
                own_variable.as_deref(),
                glibc_tunables.as_deref(),
            ) {
                Ok(Tuned::LeftToTheOperator)
            } else {
                set(parameter).map(|()| Tuned::Set(parameter.value))
            };
            (*parameter, outcome)
        })
        .collect()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set(parameter: &MallocParameter) -> Result<(), AllocatorError> {
    // SAFETY: mallopt(3) takes two integers by value and only changes a
    // parameter inside glibc's malloc, which is MT-safe; it reads or writes
    // no memory of ours. M_ARENA_MAX and M_MMAP_THRESHOLD are parameters
    // glibc documents.
    let accepted = unsafe { libc::mallopt(parameter.option, parameter.value) };
    if accepted == 1 {
        Ok(())
    } else {
        Err(AllocatorError::Refused {
            name: parameter.tunable,
            value: parameter.value,
        })
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set(_parameter: &MallocParameter) -> Result<(), AllocatorError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_parameter_is_set_unless_the_operator_chose_it() {
        let [arenas, threshold] = MALLOC_PARAMETERS;
        let chosen = |parameter, own: Option<&str>, tunables: Option<&str>| {
            chosen_by_the_operator(parameter, own.map(OsStr::new), tunables.map(OsStr::new))
        };
        assert!(!chosen(&arenas, None, None));
        assert!(!chosen(&arenas, None, Some("glibc.malloc.tcache_count=0")));
        assert!(chosen(&arenas, Some("4"), None));
        assert!(chosen(
            &arenas,
            None,
            Some("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=8")
        ));
        // One parameter chosen leaves the other to the server.
        assert!(!chosen(&threshold, None, Some("glibc.malloc.arena_max=8")));
        assert!(chosen(
            &threshold,
            None,
            Some("glibc.malloc.mmap_threshold=65536")
        ));
        assert!(chosen(&threshold, Some("65536"), None));
        // A longer tunable's name is not this one.
        assert!(!chosen(
            &arenas,
            None,
            Some("glibc.malloc.arena_max_extra=1")
        ));
    }

    #[test]
    fn the_c_library_accepts_every_parameter() {
        for parameter in &MALLOC_PARAMETERS {
            set(parameter).unwrap_or_else(|error| panic!("{error}"));
        }
    }
}
