//! Time as an injectable dependency, so that decisions depending on "now"
//! (token expiry, re-enrollment windows, liveness) are testable without sleeping.

use std::time::SystemTime;

use crate::store::UnixSeconds;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;

    fn now_unix(&self) -> UnixSeconds {
        to_unix(self.now())
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

pub fn to_unix(time: SystemTime) -> UnixSeconds {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(duration) => i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        Err(error) => -i64::try_from(error.duration().as_secs()).unwrap_or(i64::MAX),
    }
}
