//! What is on disk for the managed logins, read off the session loop: one
//! blocking read per login through [`BoundedCalls`], each waited for at
//! most [`READ_TIMEOUT`]. A login whose read has not answered by then (a
//! hung network or FUSE mount under a home directory) is reported as not
//! read and is not read again while that read is still blocked, so a user
//! can cost the agent at most one blocked thread, never the session.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::bounded::{BoundedCalls, CallOutcome};
use super::files::{
    is_safe_login, read_login, FileContents, FoundFile, LoginDirectory, LoginFindings,
    ManagedDirectory,
};

/// Longest one scan waits for the files of a login.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What one scan found, per login.
pub type Findings = BTreeMap<String, LoginFindings>;

/// Reads the files of the managed logins; keeps the reads still blocked.
pub struct DiskScanner {
    managed: ManagedDirectory,
    logins: Arc<dyn LoginDirectory>,
    reads: BoundedCalls<LoginFindings>,
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
            reads: BoundedCalls::new(timeout),
        }
    }

    /// The files of each of `logins`. Each read is waited for at most the
    /// timeout, whatever the files do.
    pub async fn scan(&mut self, logins: impl IntoIterator<Item = String>) -> Findings {
        let managed = self.managed.clone();
        let directory = Arc::clone(&self.logins);
        let safe = logins.into_iter().filter(|login| is_safe_login(login));
        self.reads
            .call_each(safe, move |login| {
                read_login(&managed, login, directory.as_ref())
            })
            .await
            .into_iter()
            .map(|(login, outcome)| {
                let login_findings = match outcome {
                    CallOutcome::Answered(login_findings) => login_findings,
                    CallOutcome::Failed(error) => {
                        not_read(&login, format!("not read: the read failed: {error}"))
                    }
                    CallOutcome::NoAnswerSince(since) => still_blocked(&login, since),
                    CallOutcome::NotTried { blocked } => not_read(
                        &login,
                        format!("not read: {blocked} reads of other files are still blocked"),
                    ),
                };
                (login, login_findings)
            })
            .collect()
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
            while scanner.reads.any_blocked() {
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
