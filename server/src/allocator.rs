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
//! nothing behind it, with one exception that [`ServerAllocator`] handles:
//! blocks of 16 KiB.
//!
//! What must never live here: anything but the process-wide allocator, its
//! settings and its statistics.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::{c_int, CStr};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};

use tikv_jemalloc_sys::{
    mallocx, sdallocx, MALLOCX_ALIGN, MALLOCX_ARENA, MALLOCX_TCACHE_NONE, MALLOCX_ZERO,
};
use tikv_jemallocator::Jemalloc;

/// jemalloc's settings, in its `MALLOC_CONF` syntax:
/// * `narenas:2`: two arenas instead of four per core. The store's calls run
///   on tokio's blocking pool, whose threads come and go; memory freed in
///   one arena is never reused by another, so fewer arenas strand less.
/// * `background_thread:true`: a background thread returns unused pages on
///   time, instead of the next allocation in that arena doing it (or none,
///   on a quiet server).
/// * `dirty_decay_ms:1000`, `muzzy_decay_ms:0`: freed pages go back to the
///   kernel within a second (jemalloc's default keeps them ten seconds, then
///   ten more as lazily freed), so a burst's memory is soon given back. Not
///   0: then every page a new block writes is a page fault, and a reconnect
///   storm of 10 000 agents took 20 % more CPU (BENCHMARKS.md). The blocks
///   that need fresh pages get them from their own arena instead
///   ([`ServerAllocator`]).
pub const JEMALLOC_SETTINGS: &CStr =
    c"narenas:2,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0";

/// The requests jemalloc serves with a 16 KiB block (its size classes, with
/// 4 KiB pages, go 14 KiB, 16 KiB, 20 KiB): those [`ServerAllocator`] sends
/// to the fresh-page arena.
const FRESH_PAGE_SIZES: RangeInclusive<usize> = (14 * 1024 + 1)..=(16 * 1024);

/// The largest alignment jemalloc gives any block of these sizes unasked
/// (`max_align_t`'s); a block asking for more keeps the ordinary path.
const FRESH_PAGE_MAX_ALIGNMENT: usize = 16;

/// No fresh-page arena (yet): every block takes the ordinary path.
const NO_ARENA: usize = usize::MAX;

/// The fresh-page arena's index, once [`set_up_fresh_page_arena`] made it.
static FRESH_PAGE_ARENA: AtomicUsize = AtomicUsize::new(NO_ARENA);

/// The server's allocator: jemalloc, with the settings above, except that
/// blocks of 16 KiB come from an arena of their own that returns each freed
/// page to the kernel at once, and never pass through a thread's cache of
/// freed blocks.
///
/// Why: a long-lived block placed on pages freed moments before keeps all
/// of them resident, the pages it never writes included. Each connection's
/// HTTP/2 write buffer is such a block: 16 KiB, written only at its start,
/// so one resident page when its pages come fresh from the kernel, five
/// (with jemalloc's cache-colouring offset) when they were recycled from a
/// block something else had written whole. With freed pages kept for a
/// second and freed 16 KiB blocks kept in the threads' caches, the sessions
/// opened after others closed got recycled ones, and the resident size
/// crept as sessions churned: up to four spare pages per connection, 16 MiB
/// per 1 000 agents (issue 17: `tests/bench/resident_pages.py
/// h2-write-buffers`, BENCHMARKS.md). Returning *every* freed page at once
/// fixed that but cost a reconnect storm 20 % more CPU; confining it to this
/// size class leaves the rest of the heap its one-second reuse.
pub struct ServerAllocator;

/// Whether a block of this layout belongs in the fresh-page arena.
fn takes_fresh_pages(layout: Layout) -> bool {
    FRESH_PAGE_SIZES.contains(&layout.size()) && layout.align() <= FRESH_PAGE_MAX_ALIGNMENT
}

/// The flag naming the fresh-page arena, if a block of this layout is to be
/// made there (and the arena exists yet).
fn fresh_page_arena_for(layout: Layout) -> Option<c_int> {
    let arena = FRESH_PAGE_ARENA.load(Ordering::Relaxed);
    (arena != NO_ARENA && takes_fresh_pages(layout)).then(|| MALLOCX_ARENA(arena))
}

/// jemalloc's flags for a fresh-page block: its alignment, and no thread
/// cache (a freed block goes straight back to its arena, and a new one is
/// never a block another thread just freed).
fn fresh_page_flags(layout: Layout) -> c_int {
    MALLOCX_ALIGN(layout.align()) | MALLOCX_TCACHE_NONE
}

#[allow(unsafe_code)]
// SAFETY: every block is allocated and freed by jemalloc. A block takes
// the fresh-page path (`mallocx`/`sdallocx` with `fresh_page_flags`)
// exactly when `takes_fresh_pages` holds for its layout, which depends on
// the layout only, so `dealloc` frees it the way it was made (for a block
// made before the arena existed, `sdallocx` without the thread cache still
// frees it to its own arena: jemalloc finds a block's arena from its
// address). The size and alignment passed to `sdallocx` are the ones the
// block was allocated with, as `GlobalAlloc` guarantees; `realloc` keeps a
// block in place only when the new size is in the same 16 KiB size class.
unsafe impl GlobalAlloc for ServerAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match fresh_page_arena_for(layout) {
            // SAFETY: the size is non-zero (at least 14 KiB + 1) and the
            // flags name a valid alignment and an arena jemalloc created.
            Some(arena_flags) => unsafe {
                mallocx(layout.size(), fresh_page_flags(layout) | arena_flags).cast()
            },
            // SAFETY: forwarded as received; the caller's guarantees hold.
            None => unsafe { Jemalloc.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // Not the trait's default (allocate, then write zeros): jemalloc
        // knows which pages are fresh from the kernel and so already zero,
        // and writing them would make every page of a large zeroed block
        // resident at once.
        match fresh_page_arena_for(layout) {
            // SAFETY: as in `alloc`; `MALLOCX_ZERO` only asks for zeroes.
            Some(arena_flags) => unsafe {
                let flags = fresh_page_flags(layout) | arena_flags | MALLOCX_ZERO;
                mallocx(layout.size(), flags).cast()
            },
            // SAFETY: forwarded as received; the caller's guarantees hold.
            None => unsafe { Jemalloc.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if !takes_fresh_pages(layout) {
            // SAFETY: forwarded as received; the caller's guarantees hold.
            return unsafe { Jemalloc.dealloc(block, layout) };
        }
        // SAFETY: `block` was allocated by jemalloc with this layout (the
        // caller's guarantee) and is freed once, with its size and
        // alignment.
        unsafe { sdallocx(block.cast(), layout.size(), fresh_page_flags(layout)) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `new_size` is non-zero and, rounded up to `layout.align()`,
        // does not overflow `isize` (the caller's guarantees).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (takes_fresh_pages(layout), takes_fresh_pages(new_layout)) {
            // SAFETY: forwarded as received; the caller's guarantees hold.
            (false, false) => unsafe { Jemalloc.realloc(block, layout, new_size) },
            // Same 16 KiB block: it already holds the new size.
            (true, true) => block,
            _ => {
                // SAFETY: `new_layout` is valid (above), and the old block
                // is read for at most the smaller size before it is freed
                // with its own layout, once.
                unsafe {
                    let moved = self.alloc(new_layout);
                    if !moved.is_null() {
                        std::ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                    moved
                }
            }
        }
    }
}

/// Creates the arena of 16 KiB blocks and makes it return freed pages at
/// once; [`ServerAllocator`] uses it from then on. Once per process (the
/// server's start); a second call keeps the first arena. Returns its index.
#[allow(unsafe_code)]
pub fn set_up_fresh_page_arena() -> Result<usize, AllocatorError> {
    let existing = FRESH_PAGE_ARENA.load(Ordering::Acquire);
    if existing != NO_ARENA {
        return Ok(existing);
    }
    // SAFETY: `arenas.create` is read as an `unsigned`, which `u32` is on
    // every platform jemalloc supports; the name ends with its NUL.
    let arena: u32 = unsafe { tikv_jemalloc_ctl::raw::read(b"arenas.create\0") }?;
    for decay in ["dirty_decay_ms", "muzzy_decay_ms"] {
        let name = format!("arena.{arena}.{decay}\0");
        // SAFETY: the decay times are `ssize_t`, which `isize` is; the name
        // ends with its NUL.
        unsafe { tikv_jemalloc_ctl::raw::write(name.as_bytes(), 0_isize) }?;
    }
    let arena = usize::try_from(arena).map_err(|_| AllocatorError::ArenaIndex(arena))?;
    match FRESH_PAGE_ARENA.compare_exchange(NO_ARENA, arena, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Ok(arena),
        // Another thread set one up meanwhile; this one stays unused.
        Err(first) => Ok(first),
    }
}

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

/// A failure to read jemalloc's statistics or to set up an arena.
#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    #[error("jemalloc refused a control call (mallctl): {0}")]
    Control(#[from] tikv_jemalloc_ctl::Error),
    #[error("jemalloc made arena {0}, an index this platform cannot hold")]
    ArenaIndex(u32),
}

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
pub fn statistics() -> Result<AllocatorStatistics, AllocatorError> {
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
    fn only_blocks_of_the_16_kib_size_class_with_plain_alignment_take_fresh_pages() {
        let cases = [
            // (size, alignment, takes fresh pages)
            (8 * 1024, 8, false),
            (14 * 1024, 8, false),
            (14 * 1024 + 1, 8, true),
            (16 * 1024, 1, true),
            (16 * 1024, 16, true),
            (16 * 1024, 32, false),
            (16 * 1024 + 1, 8, false),
            (32 * 1024, 8, false),
        ];
        for (size, alignment, expected) in cases {
            let layout = Layout::from_size_align(size, alignment).unwrap();
            assert_eq!(
                takes_fresh_pages(layout),
                expected,
                "{size} bytes, align {alignment}"
            );
        }
    }

    /// The arena jemalloc says holds `block` (`arenas.lookup`).
    fn arena_of(block: *mut u8) -> usize {
        let mut arena: u32 = 0;
        let mut arena_size = std::mem::size_of::<u32>();
        let mut block = block.cast::<std::ffi::c_void>();
        #[allow(unsafe_code)]
        // SAFETY: `arenas.lookup` reads a pointer and answers an `unsigned`;
        // both buffers are of those types, with their sizes passed along.
        let status = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"arenas.lookup".as_ptr(),
                (&raw mut arena).cast(),
                &mut arena_size,
                (&raw mut block).cast(),
                std::mem::size_of::<*mut std::ffi::c_void>(),
            )
        };
        assert_eq!(status, 0, "arenas.lookup failed");
        usize::try_from(arena).unwrap()
    }

    /// Dirty pages (freed, still resident) of one arena.
    fn dirty_pages_of(arena: usize) -> usize {
        tikv_jemalloc_ctl::epoch::advance().unwrap();
        let name = format!("stats.arenas.{arena}.pdirty\0");
        #[allow(unsafe_code)]
        // SAFETY: `pdirty` is a `size_t`; the name ends with its NUL.
        unsafe { tikv_jemalloc_ctl::raw::read::<usize>(name.as_bytes()) }.unwrap()
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_16_kib_block_lives_in_the_fresh_page_arena_which_keeps_no_freed_page() {
        let arena = set_up_fresh_page_arena().unwrap();
        assert_eq!(set_up_fresh_page_arena().unwrap(), arena, "a second arena");
        let write_buffer = Layout::from_size_align(16 * 1024, 1).unwrap();
        let read_buffer = Layout::from_size_align(8 * 1024, 1).unwrap();
        // SAFETY: non-zero layouts; each block is written within its size
        // and freed once with its own layout.
        unsafe {
            let blocks: Vec<*mut u8> = (0..8)
                .map(|_| ServerAllocator.alloc(write_buffer))
                .collect();
            let other = ServerAllocator.alloc(read_buffer);
            assert!(blocks.iter().all(|block| !block.is_null()) && !other.is_null());
            for block in &blocks {
                assert_eq!(arena_of(*block), arena);
                // Written whole, as the blocks the write buffers got before.
                std::ptr::write_bytes(*block, 0xa5, write_buffer.size());
            }
            assert_ne!(
                arena_of(other),
                arena,
                "an 8 KiB block in the fresh-page arena"
            );
            for block in blocks {
                ServerAllocator.dealloc(block, write_buffer);
            }
            ServerAllocator.dealloc(other, read_buffer);
        }
        assert_eq!(dirty_pages_of(arena), 0, "freed pages kept resident");
        // SAFETY: a non-zero layout; the block is read within its size and
        // freed once with its layout.
        unsafe {
            let zeroed = ServerAllocator.alloc_zeroed(write_buffer);
            assert!(!zeroed.is_null());
            assert_eq!(arena_of(zeroed), arena);
            let bytes = std::slice::from_raw_parts(zeroed, write_buffer.size());
            assert!(bytes.iter().all(|byte| *byte == 0), "a zeroed block is not");
            ServerAllocator.dealloc(zeroed, write_buffer);
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_block_growing_through_16_kib_keeps_its_bytes_and_moves_arena_each_way() {
        let arena = set_up_fresh_page_arena().unwrap();
        let small = Layout::from_size_align(8 * 1024, 1).unwrap();
        // SAFETY: each block is the last one returned, with the layout it
        // has now; it is written and read within its size, and freed once.
        unsafe {
            let block = ServerAllocator.alloc(small);
            assert!(!block.is_null());
            for index in 0..small.size() {
                *block.add(index) = (index % 251) as u8;
            }
            let grown = ServerAllocator.realloc(block, small, 16 * 1024);
            assert!(!grown.is_null());
            assert_eq!(arena_of(grown), arena);
            let same_class = ServerAllocator.realloc(
                grown,
                Layout::from_size_align(16 * 1024, 1).unwrap(),
                15 * 1024,
            );
            assert_eq!(same_class, grown, "moved within its size class");
            let large = Layout::from_size_align(15 * 1024, 1).unwrap();
            let moved_out = ServerAllocator.realloc(same_class, large, 32 * 1024);
            assert!(!moved_out.is_null());
            assert_ne!(arena_of(moved_out), arena);
            for index in 0..small.size() {
                assert_eq!(
                    *moved_out.add(index),
                    (index % 251) as u8,
                    "byte {index} lost"
                );
            }
            ServerAllocator.dealloc(moved_out, Layout::from_size_align(32 * 1024, 1).unwrap());
        }
    }

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
