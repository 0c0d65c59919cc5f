//! Limiters for what anyone can send before they have proven who they are:
//! token buckets for `Enroll`/`Reenroll` (one global, one per source
//! address) and counters of unauthenticated connections per source address.
//!
//! Both keep per-source state in a map whose size is itself bounded: a flood
//! from many addresses must not turn the limiter into the memory leak it is
//! there to prevent. Time is passed in (`Instant`), so the tests need no
//! sleeps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// Source addresses with their own bucket at once; beyond this (after
/// forgetting the buckets that refilled), a new source is refused.
const MAX_TRACKED_SOURCES: usize = 65_536;

/// Why an enrollment call was refused before it reached the store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateRefusal {
    #[error("too many enrollment requests from {source_address}: at most {per_second} per second (bursts of {burst}) are accepted from one address; retry later")]
    Source {
        source_address: IpAddr,
        per_second: u32,
        burst: u32,
    },
    #[error("too many enrollment requests to this server: at most {per_second} per second (bursts of {burst}); retry later")]
    Global { per_second: u32, burst: u32 },
    #[error("too many distinct addresses are enrolling at once; retry later")]
    TooManySources,
}

/// A rate: `per_second` tokens refill each second, at most `burst` kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// A classic token bucket: starts full, refills continuously.
#[derive(Debug, Clone)]
struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn full(rate: Rate, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(rate.burst),
            updated: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * f64::from(rate.per_second)).min(f64::from(rate.burst));
        self.updated = now;
    }

    fn try_take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A full bucket is the same as no bucket: it can be forgotten.
    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut copy = self.clone();
        copy.refill(rate, now);
        copy.tokens >= f64::from(rate.burst)
    }
}

/// Rate limit of enrollment calls: a global bucket (protects the store) and
/// one bucket per source address (keeps one flooding address from starving
/// every other machine).
#[derive(Debug)]
pub struct EnrollmentRateLimiter {
    global_rate: Rate,
    per_source_rate: Rate,
    global: Mutex<TokenBucket>,
    per_source: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl EnrollmentRateLimiter {
    pub fn new(global_rate: Rate, per_source_rate: Rate, now: Instant) -> Self {
        EnrollmentRateLimiter {
            global_rate,
            per_source_rate,
            global: Mutex::new(TokenBucket::full(global_rate, now)),
            per_source: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `source`'s bucket, then one from the global one.
    /// The source is checked first so that a flooding address drains only
    /// its own bucket.
    pub fn admit(&self, source: IpAddr, now: Instant) -> Result<(), RateRefusal> {
        {
            let mut buckets = self
                .per_source
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !buckets.contains_key(&source) && buckets.len() >= MAX_TRACKED_SOURCES {
                let rate = self.per_source_rate;
                buckets.retain(|_, bucket| !bucket.is_full(rate, now));
                if buckets.len() >= MAX_TRACKED_SOURCES {
                    return Err(RateRefusal::TooManySources);
                }
            }
            let bucket = buckets
                .entry(source)
                .or_insert_with(|| TokenBucket::full(self.per_source_rate, now));
            if !bucket.try_take(self.per_source_rate, now) {
                return Err(RateRefusal::Source {
                    source_address: source,
                    per_second: self.per_source_rate.per_second,
                    burst: self.per_source_rate.burst,
                });
            }
        }
        let mut global = self.global.lock().unwrap_or_else(PoisonError::into_inner);
        if global.try_take(self.global_rate, now) {
            Ok(())
        } else {
            Err(RateRefusal::Global {
                per_second: self.global_rate.per_second,
                burst: self.global_rate.burst,
            })
        }
    }

    #[cfg(test)]
    fn tracked_sources(&self) -> usize {
        self.per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Open unauthenticated connections (handshaking, or without a client
/// certificate) per source address, capped. A slot is released when its
/// [`SourceSlot`] drops; an address with no slot left has no entry at all,
/// so the map never holds more entries than there are open connections.
#[derive(Debug, Clone)]
pub struct PerSourceCounter {
    limit: u32,
    counts: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

/// One connection's place in a [`PerSourceCounter`].
#[derive(Debug)]
pub struct SourceSlot {
    source: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl PerSourceCounter {
    pub fn new(limit: u32) -> Self {
        PerSourceCounter {
            limit,
            counts: Arc::default(),
        }
    }

    /// A slot for one more connection from `source`, or `None` when that
    /// address already holds `limit`.
    pub fn try_acquire(&self, source: IpAddr) -> Option<SourceSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(source).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            source,
            counts: Arc::clone(&self.counts),
        })
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    #[cfg(test)]
    fn tracked_sources(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn address(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let start = Instant::now();
        let limiter = EnrollmentRateLimiter::new(
            Rate {
                per_second: 1000,
                burst: 1000,
            },
            Rate {
                per_second: 2,
                burst: 3,
            },
            start,
        );
        for _ in 0..3 {
            assert_eq!(limiter.admit(address(1), start), Ok(()));
        }
        let refusal = limiter.admit(address(1), start).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "too many enrollment requests from 192.0.2.1: at most 2 per second (bursts of 3) are accepted from one address; retry later"
        );
        // Another address is not affected by the first one's flood.
        assert_eq!(limiter.admit(address(2), start), Ok(()));
        // Half a second refills one token at 2/s, not two.
        let later = start + Duration::from_millis(500);
        assert_eq!(limiter.admit(address(1), later), Ok(()));
        assert!(limiter.admit(address(1), later).is_err());
        // A long pause refills only up to the burst.
        let much_later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(limiter.admit(address(1), much_later), Ok(()));
        }
        assert!(limiter.admit(address(1), much_later).is_err());
    }

    #[test]
    fn the_global_bucket_bounds_every_source_together() {
        let start = Instant::now();
        let limiter = EnrollmentRateLimiter::new(
            Rate {
                per_second: 1,
                burst: 4,
            },
            Rate {
                per_second: 10,
                burst: 10,
            },
            start,
        );
        for last in 0..4 {
            assert_eq!(limiter.admit(address(last), start), Ok(()));
        }
        assert_eq!(
            limiter.admit(address(9), start),
            Err(RateRefusal::Global {
                per_second: 1,
                burst: 4
            })
        );
        assert_eq!(
            limiter.admit(address(9), start + Duration::from_secs(1)),
            Ok(())
        );
    }

    #[test]
    fn per_source_buckets_are_bounded_and_full_ones_forgotten() {
        let start = Instant::now();
        let rate = Rate {
            per_second: 1,
            burst: 1,
        };
        let limiter = EnrollmentRateLimiter::new(
            Rate {
                per_second: u32::MAX,
                burst: u32::MAX,
            },
            rate,
            start,
        );
        let source = |index: usize| {
            let [.., a, b, c, d] = (index as u64).to_be_bytes();
            IpAddr::from([a, b, c, d])
        };
        for index in 0..MAX_TRACKED_SOURCES {
            assert_eq!(limiter.admit(source(index), start), Ok(()));
        }
        assert_eq!(
            limiter.admit(source(MAX_TRACKED_SOURCES), start),
            Err(RateRefusal::TooManySources)
        );
        assert_eq!(limiter.tracked_sources(), MAX_TRACKED_SOURCES);
        // Once their buckets refilled, the old sources are forgotten.
        let later = start + Duration::from_secs(2);
        assert_eq!(limiter.admit(source(MAX_TRACKED_SOURCES), later), Ok(()));
        assert_eq!(limiter.tracked_sources(), 1);
    }

    #[test]
    fn per_source_connections_are_capped_and_released() {
        let counter = PerSourceCounter::new(2);
        let first = counter.try_acquire(address(1));
        let second = counter.try_acquire(address(1));
        assert!(first.is_some() && second.is_some());
        assert!(counter.try_acquire(address(1)).is_none());
        let other = counter.try_acquire(address(2));
        assert!(other.is_some());
        drop(first);
        let third = counter.try_acquire(address(1));
        assert!(third.is_some());
        drop((second, third, other));
        assert_eq!(
            counter.tracked_sources(),
            0,
            "released slots leave no entry"
        );
    }
}
