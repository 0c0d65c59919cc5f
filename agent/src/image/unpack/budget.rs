//! What one payload may cost before anything of it is written: archive
//! metadata (headers, GNU long names, PAX records, padding) is counted under
//! the tar reader and cut off at its limits, since the reader buffers long
//! names whole; the declared data sizes of all entries are counted against
//! the policy's `max_total_bytes`. Also tells a complete archive (ending
//! with its end-of-archive block) from one cut at an entry boundary.

use std::cell::Cell;
use std::io::{self, Read};
use std::path::Path;
use std::rc::Rc;

use super::UnpackError;

/// A tar header, and the end-of-archive marker, is one 512-byte block.
const TAR_BLOCK_BYTES: u64 = 512;

/// Most metadata read while looking for the next entry: its header, GNU long
/// name/link, PAX records and the previous entry's padding. Real names are a
/// few KiB at most; the bound keeps a hostile long name (buffered whole by
/// the tar reader) from exhausting memory.
pub const MAX_METADATA_BYTES_PER_ENTRY: u64 = 1024 * 1024;

/// Most metadata in one archive. Every entry costs at least one 512-byte
/// header, so this also bounds the number of entries (about a million), and
/// with it inodes and time spent on an archive of empty files.
pub const MAX_METADATA_BYTES_TOTAL: u64 = 512 * 1024 * 1024;

/// The declared data sizes of all entries so far, against the limit.
#[derive(Debug)]
pub(super) struct DataBudget {
    declared_bytes: u64,
    limit: u64,
}

impl DataBudget {
    pub(super) fn new(limit: u64) -> Self {
        DataBudget {
            declared_bytes: 0,
            limit,
        }
    }

    /// Counts an entry's declared size, before anything of it is written;
    /// false if it takes the image over the limit.
    pub(super) fn charge(&mut self, declared_size: u64) -> bool {
        match self
            .declared_bytes
            .checked_add(declared_size)
            .filter(|total| *total <= self.limit)
        {
            Some(total) => {
                self.declared_bytes = total;
                true
            }
            None => false,
        }
    }
}

/// Which part of the tar stream is being read: metadata is bounded by the
/// budget, entry data by the declared sizes already checked against the
/// policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamPhase {
    Headers,
    EntryData,
}

/// Shared between the unpacker (which sets the phase around each call into
/// the tar reader) and the reader under the tar reader (which counts).
#[derive(Debug)]
pub(super) struct StreamBudget {
    phase: Cell<StreamPhase>,
    metadata_bytes_for_next_entry: Cell<u64>,
    metadata_bytes_total: Cell<u64>,
    /// Set to the limit that was hit, so the resulting I/O error from inside
    /// the tar reader can be reported as `MetadataTooLarge`.
    exceeded_limit: Cell<Option<u64>>,
}

impl Default for StreamBudget {
    fn default() -> Self {
        Self {
            phase: Cell::new(StreamPhase::Headers),
            metadata_bytes_for_next_entry: Cell::new(0),
            metadata_bytes_total: Cell::new(0),
            exceeded_limit: Cell::new(None),
        }
    }
}

impl StreamBudget {
    pub(super) fn begin_headers(&self) {
        self.phase.set(StreamPhase::Headers);
        self.metadata_bytes_for_next_entry.set(0);
    }

    pub(super) fn begin_entry_data(&self) {
        self.phase.set(StreamPhase::EntryData);
    }

    /// After the tar reader reports the end of the archive: it stops either
    /// at an all-zero header block (a complete archive) or at the end of the
    /// stream. Padding before it is under one block, so having read a whole
    /// block means the marker was there.
    pub(super) fn read_end_of_archive_block(&self) -> bool {
        self.metadata_bytes_for_next_entry.get() >= TAR_BLOCK_BYTES
    }
}

/// Counts decompressed bytes read as metadata and fails the read once a
/// metadata limit is reached, before the tar reader buffers more.
pub(super) struct BudgetedReader<R> {
    pub(super) inner: R,
    pub(super) budget: Rc<StreamBudget>,
}

impl<R: Read> Read for BudgetedReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.budget.phase.get() == StreamPhase::EntryData {
            return self.inner.read(buffer);
        }
        let left_for_entry = MAX_METADATA_BYTES_PER_ENTRY
            .saturating_sub(self.budget.metadata_bytes_for_next_entry.get());
        let left_in_total =
            MAX_METADATA_BYTES_TOTAL.saturating_sub(self.budget.metadata_bytes_total.get());
        let (allowed_bytes, binding_limit) = if left_for_entry <= left_in_total {
            (left_for_entry, MAX_METADATA_BYTES_PER_ENTRY)
        } else {
            (left_in_total, MAX_METADATA_BYTES_TOTAL)
        };
        if allowed_bytes == 0 && !buffer.is_empty() {
            self.budget.exceeded_limit.set(Some(binding_limit));
            return Err(io::Error::other(format!(
                "archive metadata exceeds {binding_limit} bytes"
            )));
        }
        let window = usize::try_from(allowed_bytes)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        let bytes_read = self.inner.read(&mut buffer[..window])?;
        let bytes_read_u64 = bytes_read as u64;
        self.budget.metadata_bytes_for_next_entry.set(
            self.budget
                .metadata_bytes_for_next_entry
                .get()
                .saturating_add(bytes_read_u64),
        );
        self.budget.metadata_bytes_total.set(
            self.budget
                .metadata_bytes_total
                .get()
                .saturating_add(bytes_read_u64),
        );
        Ok(bytes_read)
    }
}

/// Reports a failure to read the decompressed stream: a metadata budget hit,
/// or else a truncated/garbled tar or zstd stream.
pub(super) fn stream_error(
    budget: &StreamBudget,
    near_entry: Option<&Path>,
    source: io::Error,
) -> UnpackError {
    let near_entry = near_entry.map(Path::to_path_buf);
    match budget.exceeded_limit.get() {
        Some(limit) => UnpackError::MetadataTooLarge { near_entry, limit },
        None => UnpackError::Corrupt { near_entry, source },
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_archives::*;
    use super::super::{unpack_payload, UnpackPolicy};
    use super::*;
    use std::fs;

    #[test]
    fn declared_sizes_add_up_to_the_limit_and_never_past_it() {
        let mut budget = DataBudget::new(1000);
        assert!(budget.charge(600));
        assert!(!budget.charge(401));
        assert!(budget.charge(400), "a refused entry costs nothing");
        assert!(!budget.charge(1));
        assert!(budget.charge(0));
        let mut huge = DataBudget::new(u64::MAX);
        assert!(huge.charge(u64::MAX));
        assert!(!huge.charge(1), "no overflow past u64::MAX");
    }

    #[test]
    fn refuses_archives_over_the_size_limit() {
        let policy = UnpackPolicy {
            max_total_bytes: 1000,
            allow_setuid: false,
        };
        let archive = TestArchive::new()
            .file("first", 0o644, &[7; 600])
            .file("second", 0o644, &[7; 600]);
        let error = assert_refused_bytes(&archive.compressed(), &policy);
        assert!(matches!(&error, UnpackError::TooLarge { entry, limit }
                if entry == Path::new("second") && *limit == 1000));
        assert_names_entry(&error, "second");
        assert!(error.to_string().contains("1000"));
    }

    #[test]
    fn accepts_an_archive_exactly_at_the_size_limit() {
        let scratch = Scratch::new();
        let archive = TestArchive::new()
            .file("first", 0o644, &[7; 600])
            .file("second", 0o644, &[7; 400]);
        fs::write(scratch.archive_path(), archive.compressed()).unwrap();
        let policy = UnpackPolicy {
            max_total_bytes: 1000,
            allow_setuid: false,
        };
        let summary =
            unpack_payload(&scratch.archive_path(), &scratch.destination(), &policy).unwrap();
        assert_eq!(summary.total_bytes, 1000);
    }

    #[test]
    fn refuses_an_oversized_long_name_before_buffering_it() {
        let huge_name = vec![b'a'; 2 * MAX_METADATA_BYTES_PER_ENTRY as usize];
        let error = assert_refused(
            TestArchive::new()
                .file("first", 0o644, b"x")
                .gnu_long_name(&huge_name)
                .file("second", 0o644, b"x"),
        );
        assert!(
            matches!(&error, UnpackError::MetadataTooLarge { near_entry: Some(entry), limit }
                if entry == Path::new("first") && *limit == MAX_METADATA_BYTES_PER_ENTRY),
            "{error}"
        );
    }

    #[test]
    fn refuses_a_tar_missing_its_end_of_archive_block() {
        let tar_bytes = TestArchive::new().file("only", 0o644, b"data").tar_bytes();
        let payload = zstd::encode_all(&tar_bytes[..1024], 3).unwrap();
        let error = assert_refused_bytes(&payload, &default_policy());
        assert!(matches!(&error, UnpackError::Corrupt { .. }), "{error}");
        assert_names_entry(&error, "only");
    }
}
