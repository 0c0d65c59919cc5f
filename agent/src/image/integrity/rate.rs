//! A token bucket over bytes read, for the verification walk: it runs on a
//! blocking thread, so [`RateLimiter::take`] simply sleeps that thread. The
//! decision ([`RateLimiter::delay_for`]) is pure, given the instant.

use std::time::{Duration, Instant};

/// At most this much may be read at once after an idle spell (a burst).
const BURST: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct RateLimiter {
    /// 0: unlimited.
    bytes_per_second: u64,
    /// Bytes that may be read now without waiting (negative: owed).
    available: f64,
    last: Option<Instant>,
}

impl RateLimiter {
    pub fn new(bytes_per_second: u64) -> Self {
        RateLimiter {
            bytes_per_second,
            available: 0.0,
            last: None,
        }
    }

    pub fn unlimited() -> Self {
        RateLimiter::new(0)
    }

    /// Accounts for `bytes` just read at `now`; returns how long to wait
    /// before reading more so that the average stays at the rate.
    pub fn delay_for(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.bytes_per_second == 0 {
            return Duration::ZERO;
        }
        let rate = self.bytes_per_second as f64;
        let burst = rate * BURST.as_secs_f64();
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * rate;
            self.available = (self.available + refill).min(burst);
        }
        self.last = Some(now);
        self.available -= bytes as f64;
        if self.available >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.available / rate)
        }
    }

    /// Accounts for `bytes` and sleeps the calling (blocking) thread as needed.
    pub fn take(&mut self, bytes: u64) {
        let delay = self.delay_for(bytes, Instant::now());
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_follow_the_rate_and_idle_time_earns_only_a_burst() {
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        // (bytes read, at ms, expected delay ms) at 1 000 000 bytes/s.
        let cases: [(u64, u64, u64); 5] = [
            (500_000, 0, 500),   // nothing saved up yet: the read is paid for
            (500_000, 500, 500), // read right after the wait: paid again
            (0, 10_500, 0),      // ten seconds idle: earns only the 100 ms burst
            (300_000, 10_500, 200),
            (100_000, 10_700, 100),
        ];
        let mut limiter = RateLimiter::new(1_000_000);
        for (bytes, now, expected) in cases {
            let delay = limiter.delay_for(bytes, at(now));
            assert_eq!(
                delay.as_millis() as u64,
                expected,
                "{bytes} bytes at {now} ms"
            );
        }
    }

    #[test]
    fn unlimited_never_waits() {
        let mut limiter = RateLimiter::unlimited();
        assert_eq!(limiter.delay_for(u64::MAX, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn taking_bytes_on_a_real_clock_keeps_to_the_rate() {
        // 3 MB at 10 MB/s: at least 270 ms (the 10 % allowance is for the
        // first chunk, paid before any time passed).
        let mut limiter = RateLimiter::new(10_000_000);
        let started = Instant::now();
        for _ in 0..12 {
            limiter.take(250_000);
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(270), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }
}
