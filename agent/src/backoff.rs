//! Reconnect backoff: exponential with full jitter, so that a fleet that lost
//! its server does not reconnect in lockstep when it returns.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The ceiling of the next delay: initial × 2^attempt, capped at max.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniformly drawn in [ceiling/2, ceiling] from `unit`
    /// (a number in [0, 1)), then the ceiling doubles.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let unit = unit.clamp(0.0, 1.0);
        ceiling.mul_f64(0.5 + unit / 2.0)
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(random_unit())
    }
}

/// An index in `0..length` (0 if empty), from [`random_unit`]: where a
/// list of server addresses starts, so that a fleet spreads over replicas.
pub fn random_index(length: usize) -> usize {
    // Truncation toward zero keeps the index below `length`.
    (random_unit() * length as f64) as usize % length.max(1)
}

/// A number in [0, 1) from the OS random generator (via uuid v4).
pub fn random_unit() -> f64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    f64::from(value) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let cases = [
            (0.0, Duration::from_millis(50)),
            (1.0, Duration::from_millis(200)),
            (0.0, Duration::from_millis(200)),
            (0.5, Duration::from_millis(600)),
            (1.0, Duration::from_secs(1)),
            (1.0, Duration::from_secs(1)),
        ];
        for (unit, expected) in cases {
            assert_eq!(backoff.next_with(unit), expected);
        }
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn random_indexes_stay_in_range_and_reach_every_slot() {
        let mut seen = [false; 3];
        for _ in 0..1000 {
            seen[random_index(3)] = true;
        }
        assert_eq!(seen, [true; 3]);
        assert_eq!(random_index(0), 0);
        assert_eq!(random_index(1), 0);
    }

    #[test]
    fn random_units_stay_in_range() {
        for _ in 0..1000 {
            let unit = random_unit();
            assert!((0.0..1.0).contains(&unit));
        }
    }
}
