//! When the server signs the audit chain's head: pure.

use flotte_common::audit::UnixSeconds;

/// Whether to sign `head_seq` now, given the last checkpoint (`seq`, `at`):
/// something new is unsigned, and either `every_entries` entries follow the
/// last checkpoint or `interval_seconds` passed since it.
pub fn checkpoint_due(
    head_seq: u64,
    last: Option<(u64, UnixSeconds)>,
    now: UnixSeconds,
    every_entries: u64,
    interval_seconds: i64,
) -> bool {
    match last {
        None => head_seq > 0,
        Some((signed_seq, _)) if head_seq <= signed_seq => false,
        Some((signed_seq, signed_at)) => {
            head_seq - signed_seq >= every_entries || now - signed_at >= interval_seconds
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_due_after_n_entries_or_the_interval_and_never_twice() {
        let cases = [
            (0, None, 0, false),
            (1, None, 0, true),
            (5, Some((5, 0)), 1_000, false),
            (4, Some((5, 0)), 1_000, false),
            (6, Some((5, 100)), 150, false),
            (15, Some((5, 100)), 150, true),
            (6, Some((5, 100)), 400, true),
        ];
        for (head, last, now, expected) in cases {
            assert_eq!(
                checkpoint_due(head, last, now, 10, 300),
                expected,
                "{head} {last:?} {now}"
            );
        }
    }
}
