//! What is on disk for the managed logins, read off the session loop: one
//! blocking read per login on tokio's blocking pool (a few at a time), each
//! waited for at most [`READ_TIMEOUT`]. A login whose read has not answered
//! by then (a hung network or FUSE mount under a home directory) is
//! reported as not read and is not read again while that read is still
//! blocked, so a user can cost the agent at most one blocked thread, never
//! the session.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::task::JoinHandle;

use super::files::{
    is_safe_login, read_login, FileContents, FoundFile, LoginDirectory, LoginFindings,
    ManagedDirectory,
};

/// Longest one scan waits for the files of a login.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Logins read at once: many logins never fill the blocking pool, and a
/// queued read is never mistaken for a blocked one.
const PARALLEL_READS: usize = 16;

/// What one scan found, per login.
pub type Findings = BTreeMap<String, LoginFindings>;

struct BlockedRead {
    read: JoinHandle<LoginFindings>,
    /// When the read started (wall clock: it is shown, and stays the same
    /// from scan to scan so that the report does not change while blocked).
    since: SystemTime,
}

enum ReadOutcome {
    Answered(LoginFindings),
    Blocked(BlockedRead),
}

/// Reads the files of the managed logins; keeps the reads still blocked.
pub struct DiskScanner {
    managed: ManagedDirectory,
    logins: Arc<dyn LoginDirectory>,
    timeout: Duration,
    blocked: HashMap<String, BlockedRead>,
}

impl DiskScanner {
    pub fn new(
        managed: ManagedDirectory,
        logins: Arc<dyn LoginDirectory>,
        timeout: Duration,
    ) -> Self {
        DiskScanner {
            managed,
            logins,
            timeout,
            blocked: HashMap::new(),
        }
    }

    /// The files of each of `logins`. Each read is waited for at most the
    /// timeout, whatever the files do.
    pub async fn scan(&mut self, logins: impl IntoIterator<Item = String>) -> Findings {
        let mut findings = Findings::new();
        let mut to_read = Vec::new();
        for login in logins {
            if !is_safe_login(&login) {
                continue;
            }
            if let Some(blocked) = self.blocked.remove(&login) {
                if !blocked.read.is_finished() {
                    findings.insert(login.clone(), still_blocked(&login, blocked.since));
                    self.blocked.insert(login, blocked);
                    continue;
                }
                // Answered at last, but late: read again for a fresh view.
            }
            to_read.push(login);
        }
        let managed = &self.managed;
        let directory = &self.logins;
        let timeout = self.timeout;
        let outcomes: Vec<(String, ReadOutcome)> = futures::stream::iter(to_read)
            .map(|login| {
                let managed = managed.clone();
                let directory = Arc::clone(directory);
                async move {
                    let read_of = login.clone();
                    let since = SystemTime::now();
                    let mut read = tokio::task::spawn_blocking(move || {
                        read_login(&managed, &read_of, directory.as_ref())
                    });
                    let outcome = match tokio::time::timeout(timeout, &mut read).await {
                        Ok(Ok(login_findings)) => ReadOutcome::Answered(login_findings),
                        Ok(Err(error)) => ReadOutcome::Answered(not_read(
                            &login,
                            format!("not read: the read failed: {error}"),
                        )),
                        Err(_) => ReadOutcome::Blocked(BlockedRead { read, since }),
                    };
                    (login, outcome)
                }
            })
            .buffer_unordered(PARALLEL_READS)
            .collect()
            .await;
        for (login, outcome) in outcomes {
            let login_findings = match outcome {
                ReadOutcome::Answered(login_findings) => login_findings,
                ReadOutcome::Blocked(blocked) => {
                    let reported = still_blocked(&login, blocked.since);
                    self.blocked.insert(login.clone(), blocked);
                    reported
                }
            };
            findings.insert(login, login_findings);
        }
        findings
    }
}

fn not_read(login: &str, reason: String) -> LoginFindings {
    LoginFindings {
        files: vec![FoundFile {
            login: login.to_owned(),
            source: format!("the authorized_keys files of {login}"),
            contents: FileContents::NotRead(reason),
        }],
        missing: false,
    }
}

fn still_blocked(login: &str, since: SystemTime) -> LoginFindings {
    not_read(
        login,
        format!(
            "not read: no answer from the filesystem since {}",
            humantime::format_rfc3339_seconds(since)
        ),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::access::files::{LoginAccount, LoginDirectory};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A user database whose lookups of `hung` block until released, as
    /// a hung network home would.
    struct HangingLogins {
        hung: String,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
        lookups_of_hung: AtomicUsize,
        home: std::path::PathBuf,
    }

    impl LoginDirectory for HangingLogins {
        fn account_of(&self, login: &str) -> Option<LoginAccount> {
            if login == self.hung {
                self.lookups_of_hung.fetch_add(1, Ordering::SeqCst);
                let _ = self.release.lock().unwrap().recv();
            }
            Some(LoginAccount {
                home: self.home.clone(),
                uid: nix::unistd::getuid().as_raw(),
                shell: std::path::PathBuf::from("/bin/sh"),
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_login_costs_one_blocked_read_and_never_the_others() {
        let root = std::env::temp_dir().join(format!("flotte-scan-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(root.join("home/.ssh")).unwrap();
        std::fs::write(root.join("home/.ssh/authorized_keys"), "ssh-ed25519 HAND\n").unwrap();
        let (release, released) = std::sync::mpsc::channel();
        let logins = Arc::new(HangingLogins {
            hung: "mallory".into(),
            release: Mutex::new(released),
            lookups_of_hung: AtomicUsize::new(0),
            home: root.join("home"),
        });
        let managed = ManagedDirectory::new(&root.join("managed"));
        let mut scanner = DiskScanner::new(
            managed,
            Arc::clone(&logins) as Arc<dyn LoginDirectory>,
            Duration::from_millis(300),
        );
        let both = || ["alice".to_owned(), "mallory".to_owned()];

        let started = std::time::Instant::now();
        let findings = scanner.scan(both()).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            findings["alice"].files[0].contents,
            FileContents::Keys(vec!["ssh-ed25519 HAND".into()])
        );
        assert!(
            matches!(&findings["mallory"].files[0].contents, FileContents::NotRead(reason) if reason.contains("no answer")),
            "{findings:?}"
        );

        // Still blocked: reported again in the same words (no news for the
        // server at every report), and not read a second time.
        let first_report = findings["mallory"].clone();
        let findings = scanner.scan(both()).await;
        assert_eq!(findings["mallory"], first_report);
        assert_eq!(logins.lookups_of_hung.load(Ordering::SeqCst), 1);

        // Once it answers, the next scan reads it again.
        release.send(()).unwrap();
        let answered = async {
            while !scanner.blocked["mallory"].read.is_finished() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), answered)
            .await
            .unwrap();
        release.send(()).unwrap();
        let findings = scanner.scan(both()).await;
        assert_eq!(
            findings["mallory"].files[0].contents,
            FileContents::Keys(vec!["ssh-ed25519 HAND".into()])
        );
        assert_eq!(logins.lookups_of_hung.load(Ordering::SeqCst), 2);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
