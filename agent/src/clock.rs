//! The agent's one reading of the wall clock, in Unix seconds (what the
//! wire and the persisted files carry). Decisions take `now` as an
//! argument so that they stay pure; only their callers read the clock.

use std::time::SystemTime;

/// Seconds since the Unix epoch; 0 for a clock set before 1970, and
/// saturated far in the future rather than wrapped.
pub fn unix_now() -> i64 {
    unix_seconds(SystemTime::now())
}

/// `time` in Unix seconds, with the same rules as [`unix_now`].
pub fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |duration| {
            i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_before_the_epoch_are_zero_and_later_ones_their_seconds() {
        assert_eq!(
            unix_seconds(SystemTime::UNIX_EPOCH - Duration::from_secs(5)),
            0
        );
        assert_eq!(
            unix_seconds(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_999)),
            1_700_000_000
        );
    }
}
