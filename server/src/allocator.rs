//! The memory allocator of the long-running server process: jemalloc,
//! linked into the `flotte-server` binary in place of the C library's malloc
//! (Rust's allocations and C's alike, the bundled SQLite's included), with
//! the settings below built in. The binary declares the allocator and hands
//! jemalloc these settings (`bin/flotte-server.rs`); this module says what
//! they are and why, so that the start log and the docs can quote them, and
//! reads jemalloc's statistics for the metrics: the bytes the program holds
//! against the pages jemalloc keeps resident, which tell a leak from memory
//! kept for later.
//!
//! Why: the soak (BENCHMARKS.md, issue 17) showed the resident size of a
//! server with a flat live heap rising for an hour. Under glibc's malloc,
//! even with two arenas and a fixed mmap threshold, each new agent session's
//! buffers (h2's, tonic's, about 40 KiB) landed in holes other sessions had
//! left and kept pages resident that the heap could not give back: +9 % over
//! the hour. jemalloc groups blocks by size class and returns the pages it
//! no longer uses to the kernel after a set delay, so the same churn leaves
//! nothing behind it.
//!
//! What must never live here: anything but process-wide allocator settings
//! and statistics.

use std::ffi::CStr;

/// jemalloc's settings, in its `MALLOC_CONF` syntax:
/// * `narenas:2`: two arenas instead of four per core. The store's calls run
///   on tokio's blocking pool, whose threads come and go; memory freed in
///   one arena is never reused by another, so fewer arenas strand less.
/// * `background_thread:true`: a background thread returns unused pages on
///   time, instead of the next allocation in that arena doing it (or none,
///   on a quiet server).
/// * `dirty_decay_ms:0`, `muzzy_decay_ms:0`: freed pages go back to the
///   kernel at once (jemalloc's default keeps them ten seconds, then ten
///   more as lazily freed). A long-lived block placed on pages freed moments
///   before keeps all of them resident, the pages it never writes included.
///   Each connection's HTTP/2 write buffer is such a block: 16 KiB, written
///   only at its start, so one resident page when its pages come fresh from
///   the kernel, five when they were recycled. With freed pages kept for a
///   second (and freed 16 KiB blocks kept in the threads' caches, below),
///   the sessions opened after others closed got recycled ones, and the
///   resident size crept as sessions churned (issue 17:
///   `tests/bench/resident_pages.py h2-write-buffers`, BENCHMARKS.md). The
///   cost is a page fault for each page a new block writes: a few hundred a
///   second at 1 000 steady agents, but 13–14 % more CPU when 10 000
///   reconnect at once (the reconnect storm, BENCHMARKS.md); an operator
///   who cares more for that can set `MALLOC_CONF=dirty_decay_ms:1000`.
/// * `tcache_max:8192`: a thread keeps freed blocks of at most 8 KiB for its
///   next request of that size (jemalloc's default: 32 KiB), so a freed
///   16 KiB block, fully written by whatever used it last, is not handed
///   straight to a new connection's write buffer either.
pub const JEMALLOC_SETTINGS: &CStr =
    c"narenas:2,background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0,tcache_max:8192";

/// The environment variable jemalloc reads after the built-in settings: an
/// operator's value overrides them option by option (e.g. `narenas:8` on a
/// host with many cores, keeping the rest).
pub const OPERATOR_SETTINGS_VARIABLE: &str = "MALLOC_CONF";

/// The settings as text, for the start log.
pub fn built_in_settings() -> &'static str {
    // The literal above is ASCII; an empty answer would only hide it from
    // the log, never change what jemalloc reads.
    JEMALLOC_SETTINGS.to_str().unwrap_or_default()
}

/// A failure to read jemalloc's statistics (`mallctl`'s error number).
#[derive(Debug, thiserror::Error)]
#[error("jemalloc's statistics could not be read: {0}")]
pub struct StatisticsError(#[from] tikv_jemalloc_ctl::Error);

/// What jemalloc says of the process's memory, in bytes, as of one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocatorStatistics {
    /// Bytes the program has allocated and not freed: its live data.
    pub allocated: u64,
    /// Bytes in the pages jemalloc counts as resident: live data, its own
    /// metadata, and freed pages not yet returned. An upper bound: pages of
    /// an allocation never written are counted, though the kernel has not
    /// given them yet (the soak's run in BENCHMARKS.md).
    pub resident: u64,
    /// Bytes jemalloc keeps mapped but gave back to the kernel (virtual
    /// address space only, reused before new mappings are made).
    pub retained: u64,
}

/// Reads jemalloc's current statistics. jemalloc caches them; advancing its
/// epoch refreshes the cache first, so two reads in a row agree with what
/// happened between them.
pub fn statistics() -> Result<AllocatorStatistics, StatisticsError> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance()?;
    let bytes = |value: usize| u64::try_from(value).unwrap_or(u64::MAX);
    Ok(AllocatorStatistics {
        allocated: bytes(stats::allocated::read()?),
        resident: bytes(stats::resident::read()?),
        retained: bytes(stats::retained::read()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_setting_is_an_option_with_a_value() {
        // jemalloc warns on stderr and ignores a malformed pair: each must be
        // `name:value`, once. (That jemalloc applies them is checked on the
        // real binary: server/tests/cli.rs.)
        let settings = built_in_settings();
        assert!(!settings.is_empty());
        let mut names = Vec::new();
        for pair in settings.split(',') {
            let (name, value) = pair
                .split_once(':')
                .unwrap_or_else(|| panic!("{pair:?} has no value"));
            assert!(!name.is_empty() && !value.is_empty(), "{pair:?}");
            assert!(!names.contains(&name), "{name} set twice");
            names.push(name);
        }
    }
}
