//! Blocking calls made per login (a user-database lookup, a read of a
//! user's files) on tokio's blocking pool, a few at a time, each waited for
//! at most a timeout. A call that has not answered by then (a hung LDAP or
//! sssd, a hung network home) is kept, not repeated: while it is still
//! blocked its login is answered "no answer since …" without a new call, so
//! a login costs at most one blocked thread, and at most
//! [`MAX_BLOCKED_CALLS`] threads are ever left blocked by one user of this
//! type. Nothing here is ever awaited by the session loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::task::JoinHandle;

/// Calls run at once: many logins never fill the blocking pool, and a
/// queued call is never mistaken for a blocked one.
const PARALLEL_CALLS: usize = 16;
/// Calls left blocked at most (per [`BoundedCalls`]); logins beyond are not
/// tried until some answer.
pub const MAX_BLOCKED_CALLS: usize = 32;

/// What became of the call for one login.
#[derive(Debug)]
pub enum CallOutcome<T> {
    Answered(T),
    /// The call panicked or was cancelled.
    Failed(String),
    /// Still no answer; the call started at this (wall-clock) time, which
    /// stays the same from round to round so that reports do not change
    /// while it is blocked.
    NoAnswerSince(SystemTime),
    /// Not tried: this many calls are already blocked.
    NotTried {
        blocked: usize,
    },
}

/// One call after its wait: answered (or failed), or still blocked.
type Waited<T> = (String, Result<CallOutcome<T>, BlockedCall<T>>);

struct BlockedCall<T> {
    call: JoinHandle<T>,
    since: SystemTime,
}

/// Blocking calls per login, each bounded in time; keeps the blocked ones.
pub struct BoundedCalls<T> {
    timeout: Duration,
    blocked: HashMap<String, BlockedCall<T>>,
}

impl<T: Send + 'static> BoundedCalls<T> {
    pub fn new(timeout: Duration) -> Self {
        BoundedCalls {
            timeout,
            blocked: HashMap::new(),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether some call is still blocked (its login deserves another
    /// round once it answers).
    pub fn any_blocked(&mut self) -> bool {
        self.blocked
            .retain(|_, blocked| !blocked.call.is_finished());
        !self.blocked.is_empty()
    }

    /// Calls `call(login)` for each of `logins` off the caller's task and
    /// returns within about one timeout per [`PARALLEL_CALLS`] logins,
    /// whatever the calls do. A login whose previous call answered late is
    /// called again, for a fresh answer.
    pub async fn call_each<F>(
        &mut self,
        logins: impl IntoIterator<Item = String>,
        call: F,
    ) -> Vec<(String, CallOutcome<T>)>
    where
        F: Fn(&str) -> T + Send + Sync + 'static,
    {
        let call = Arc::new(call);
        let mut outcomes = Vec::new();
        let mut to_call = Vec::new();
        for login in logins {
            if let Some(blocked) = self.blocked.remove(&login) {
                if !blocked.call.is_finished() {
                    outcomes.push((login.clone(), CallOutcome::NoAnswerSince(blocked.since)));
                    self.blocked.insert(login, blocked);
                    continue;
                }
            }
            to_call.push(login);
        }
        let mut remaining = to_call.into_iter().peekable();
        while remaining.peek().is_some() {
            let room = MAX_BLOCKED_CALLS.saturating_sub(self.blocked.len());
            if room == 0 {
                let blocked = self.blocked.len();
                outcomes.extend(remaining.map(|login| (login, CallOutcome::NotTried { blocked })));
                break;
            }
            // Never more in flight than may still be left blocked.
            let batch: Vec<String> = remaining.by_ref().take(room.min(PARALLEL_CALLS)).collect();
            let timeout = self.timeout;
            let answered: Vec<Waited<T>> = futures::stream::iter(batch)
                .map(|login| {
                    let call = Arc::clone(&call);
                    async move {
                        let called_with = login.clone();
                        let since = SystemTime::now();
                        let mut handle = tokio::task::spawn_blocking(move || call(&called_with));
                        let outcome = match tokio::time::timeout(timeout, &mut handle).await {
                            Ok(Ok(answer)) => Ok(CallOutcome::Answered(answer)),
                            Ok(Err(error)) => Ok(CallOutcome::Failed(error.to_string())),
                            Err(_) => Err(BlockedCall {
                                call: handle,
                                since,
                            }),
                        };
                        (login, outcome)
                    }
                })
                .buffer_unordered(PARALLEL_CALLS)
                .collect()
                .await;
            for (login, outcome) in answered {
                match outcome {
                    Ok(outcome) => outcomes.push((login, outcome)),
                    Err(blocked) => {
                        outcomes.push((login.clone(), CallOutcome::NoAnswerSince(blocked.since)));
                        self.blocked.insert(login, blocked);
                    }
                }
            }
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocked_calls_are_kept_not_repeated_and_capped() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut bounded = BoundedCalls::new(Duration::from_millis(200));
        let hanging = |released: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
                       calls: Arc<AtomicUsize>| {
            move |login: &str| {
                calls.fetch_add(1, Ordering::SeqCst);
                if login.starts_with("hung") {
                    // Until the test ends (the sender is dropped).
                    let _ = released.lock().map(|receiver| receiver.recv());
                }
                login.len()
            }
        };
        let logins: Vec<String> = (0..MAX_BLOCKED_CALLS + 5)
            .map(|index| format!("hung{index}"))
            .chain(["alice".to_owned()])
            .collect();
        let started = std::time::Instant::now();
        let outcomes = bounded
            .call_each(
                logins.clone(),
                hanging(Arc::clone(&released), Arc::clone(&calls)),
            )
            .await;
        // Two rounds of 16 blocked calls, each waited for once.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let count = |matches: fn(&CallOutcome<usize>) -> bool| {
            outcomes
                .iter()
                .filter(|(_, outcome)| matches(outcome))
                .count()
        };
        assert_eq!(
            count(|outcome| matches!(outcome, CallOutcome::NoAnswerSince(_))),
            MAX_BLOCKED_CALLS
        );
        assert_eq!(
            count(
                |outcome| matches!(outcome, CallOutcome::NotTried { blocked } if *blocked == MAX_BLOCKED_CALLS)
            ),
            6
        );
        assert!(bounded.any_blocked());

        // Again: nothing new is called while they are blocked.
        let before = calls.load(Ordering::SeqCst);
        let outcomes = bounded
            .call_each(logins, hanging(Arc::clone(&released), Arc::clone(&calls)))
            .await;
        assert_eq!(calls.load(Ordering::SeqCst), before);
        assert!(outcomes
            .iter()
            .all(|(_, outcome)| !matches!(outcome, CallOutcome::Answered(_))));
        drop(release);
    }
}
