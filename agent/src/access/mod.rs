//! SSH access for people, enforced on this machine: the agent keeps one
//! managed `authorized_keys` file per granted login (for sshd's
//! `AuthorizedKeysFile /etc/flotte/authorized_keys/%u`), answers sshd's
//! `AuthorizedKeysCommand` from its persisted policy (`flotte-agent
//! authorized-keys LOGIN`), enforces expiry with its own timer even when the
//! server is unreachable, optionally fails closed after a long disconnection,
//! and optionally ends the live sessions of a login that lost a key.
//!
//! Decisions are pure (`policy`, and `boundary`: what this machine lets
//! the server install at all — no root, no system account, only bare valid
//! key lines — whatever the server sends); disk and the user database sit
//! behind `files`. This module never talks to the server: the session hands it
//! policies and sends what it reports. It must never write outside its
//! managed directory and its state file, and never follow a login name that
//! could be a path. What users control (their `~/.ssh/authorized_keys`) is
//! read by `scan`, on the blocking pool with a timeout, never on the
//! session loop: the session only asks for a scan and is told when one is
//! done, so no file can stop a revocation from being applied.

pub mod boundary;
pub mod files;
pub mod policy;
pub mod scan;
pub mod settings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use flotte_proto::v1::{AccessPolicy, AccessRefusal, AccessState, FoundKeys};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::boundary::{screen, AllowedLogins, Boundary, Refusal, UidRange, LOGIN_DEFS};
use self::files::{FileContents, LoginDirectory, ManagedDirectory, SystemLogins};
use self::policy::{
    authorized_keys_text, keys_in_force, next_change_after, should_apply, Contact, LocalKey,
    LocalPolicy, OnDisconnect,
};
use self::scan::{DiskScanner, Findings, READ_TIMEOUT};
use crate::clock::unix_now;
use crate::session::AccessHandler;

/// While connected, the last-contact time is persisted at most this often;
/// a "connected" state older than [`CONTACT_STALE_AFTER`] is not believed
/// (the agent was killed while connected).
const CONTACT_PERSIST_EVERY: i64 = 60;
const CONTACT_STALE_AFTER: i64 = 180;
/// Even with no expiry ahead the enforcer wakes this often (contact upkeep).
const ENFORCER_MAX_SLEEP: Duration = Duration::from_secs(60);
/// Name of the persisted policy in the agent's data dir.
pub const ACCESS_STATE_FILE: &str = "access-policy.json";

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read the access state {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("cannot write the access state {path}: {source}")]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot update the managed authorized_keys directory {path}: {source}")]
    Files {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Validated `[access]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessSettings {
    pub authorized_keys_dir: PathBuf,
    pub terminate_sessions: bool,
    pub on_disconnect: OnDisconnect,
    pub allowed_logins: AllowedLogins,
}

/// What survives a restart: the applied policy and when the server was
/// last heard from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedAccess {
    /// The policy as screened by the boundary: only what may be installed.
    pub policy: LocalPolicy,
    /// What the boundary left out of it, and why.
    #[serde(default)]
    pub refused: Vec<Refusal>,
    pub connected: bool,
    pub last_contact_at: i64,
}

impl PersistedAccess {
    /// Since when the server is considered away at `now`.
    pub fn contact(&self, now: i64) -> Contact {
        let believed_connected =
            self.connected && now.saturating_sub(self.last_contact_at) <= CONTACT_STALE_AFTER;
        Contact {
            disconnected_since: (!believed_connected).then_some(self.last_contact_at),
        }
    }
}

pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ACCESS_STATE_FILE)
}

/// The persisted access state, or the empty one on first start.
pub fn load_state(data_dir: &Path) -> Result<PersistedAccess, AccessError> {
    let path = state_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|error| AccessError::State {
            path,
            message: error.to_string(),
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Ok(PersistedAccess::default())
        }
        Err(error) => Err(AccessError::State {
            path,
            message: error.to_string(),
        }),
    }
}

/// The policy received from the server, in the agent's own types.
pub fn local_policy(policy: &AccessPolicy) -> LocalPolicy {
    LocalPolicy {
        version: policy.version,
        logins: policy
            .logins
            .iter()
            .map(|login| {
                (
                    login.login.clone(),
                    login
                        .keys
                        .iter()
                        .map(|key| LocalKey {
                            public_key: key.public_key.clone(),
                            user: key.user.clone(),
                            grant_id: key.grant_id.clone(),
                            expires_at: (key.expires_at > 0).then_some(key.expires_at),
                        })
                        .collect(),
                )
            })
            .collect(),
    }
}

/// `flotte-agent authorized-keys LOGIN`: the keys in force for `login` now,
/// from the persisted state (expiry and fail-closed applied here too, so a
/// stopped agent cannot keep an expired key alive).
pub fn authorized_keys_for(
    data_dir: &Path,
    on_disconnect: OnDisconnect,
    login: &str,
    now: i64,
) -> Result<String, AccessError> {
    let state = load_state(data_dir)?;
    let in_force = keys_in_force(&state.policy, now, on_disconnect, state.contact(now));
    Ok(in_force
        .get(login)
        .map(|keys| authorized_keys_text(keys))
        .unwrap_or_default())
}

struct Inner {
    persisted: PersistedAccess,
    in_force: Option<BTreeMap<String, Vec<LocalKey>>>,
    last_sent: Option<AccessState>,
    /// The latest scan of the files on disk.
    findings: Findings,
}

/// The running enforcement: one per agent, shared by the session (which
/// hands it policies) and its own expiry timer task.
pub struct AccessEnforcer {
    settings: AccessSettings,
    boundary: Boundary,
    data_dir: PathBuf,
    managed: ManagedDirectory,
    logins: Arc<dyn LoginDirectory>,
    inner: Mutex<Inner>,
    wake: tokio::sync::Notify,
    scan_wanted: tokio::sync::Notify,
    /// Counts finished scans; the session waits on it for news to report.
    scans_done: watch::Sender<u64>,
}

impl std::fmt::Debug for AccessEnforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessEnforcer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AccessEnforcer {
    /// Loads the persisted policy and enforces it at once (so expiry that
    /// happened while the agent was down takes effect before any session).
    /// The persisted policy is screened again first: the boundary may have
    /// narrowed since it was applied (a wider one takes effect with the
    /// server's next policy).
    pub fn open(settings: AccessSettings, data_dir: &Path) -> Result<Arc<Self>, AccessError> {
        let mut persisted = load_state(data_dir)?;
        let boundary = Boundary {
            allowed: settings.allowed_logins.clone(),
            people_uids: UidRange::of_this_machine(Path::new(LOGIN_DEFS)),
        };
        let (policy, newly_refused) = screen(&persisted.policy, &boundary, &SystemLogins);
        persisted.policy = policy;
        persisted.refused.extend(newly_refused);
        persisted.refused.truncate(boundary::MAX_REFUSALS);
        let enforcer = Arc::new(AccessEnforcer {
            managed: ManagedDirectory::new(&settings.authorized_keys_dir),
            settings,
            boundary,
            data_dir: data_dir.to_owned(),
            logins: Arc::new(SystemLogins),
            inner: Mutex::new(Inner {
                persisted,
                in_force: None,
                last_sent: None,
                findings: Findings::new(),
            }),
            wake: tokio::sync::Notify::new(),
            scan_wanted: tokio::sync::Notify::new(),
            scans_done: watch::Sender::new(0),
        });
        for problem in enforcer.managed.strict_modes_problems() {
            tracing::warn!(%problem, "sshd StrictModes would refuse the managed authorized_keys files");
        }
        enforcer.enforce(unix_now())?;
        enforcer.request_scan();
        Ok(enforcer)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each critical section replaces whole values: still consistent after a panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn persist(&self, persisted: &PersistedAccess) -> Result<(), AccessError> {
        let path = state_path(&self.data_dir);
        let text = serde_json::to_vec_pretty(persisted).map_err(|error| AccessError::State {
            path: path.clone(),
            message: error.to_string(),
        })?;
        // Public keys only; read by `flotte-agent authorized-keys`.
        flotte_proto::files::write_atomically_with_mode(&path, &text, 0o644)
            .map_err(|source| AccessError::Persist { path, source })
    }

    pub fn applied_version(&self) -> u64 {
        self.lock().persisted.policy.version
    }

    /// Applies what the boundary lets through of `policy` if it is newer
    /// (or the same version recompiled for new labels); true if it was
    /// applied.
    pub fn receive(&self, policy: LocalPolicy, now: i64) -> Result<bool, AccessError> {
        // The user database is read before the lock (it may be slow).
        let (policy, refused) = screen(&policy, &self.boundary, self.logins.as_ref());
        {
            let mut inner = self.lock();
            let refusals_changed = inner.persisted.refused != refused;
            if !should_apply(&inner.persisted.policy, &policy) && !refusals_changed {
                return Ok(false);
            }
            if refusals_changed {
                log_refusals(&refused);
            }
            inner.persisted.policy = policy;
            inner.persisted.refused = refused;
            inner.persisted.connected = true;
            inner.persisted.last_contact_at = now;
            self.persist(&inner.persisted)?;
        }
        self.enforce(now)?;
        self.wake.notify_one();
        self.request_scan();
        Ok(true)
    }

    /// Records contact with the server (`connected`) or its loss.
    pub fn record_contact(&self, connected: bool, now: i64) {
        let mut inner = self.lock();
        if !contact_update_due(&inner.persisted, connected, now) {
            return;
        }
        inner.persisted.connected = connected;
        inner.persisted.last_contact_at = now;
        if let Err(error) = self.persist(&inner.persisted) {
            tracing::warn!(%error, "cannot persist the access contact time");
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Writes the managed files for the keys in force at `now`; with
    /// `terminate_sessions`, ends the sessions of logins that lost a key.
    pub fn enforce(&self, now: i64) -> Result<(), AccessError> {
        let mut inner = self.lock();
        let contact = inner.persisted.contact(now);
        let in_force = keys_in_force(
            &inner.persisted.policy,
            now,
            self.settings.on_disconnect,
            contact,
        );
        if inner.in_force.as_ref() == Some(&in_force) {
            return Ok(());
        }
        let outcome = self
            .managed
            .sync(&in_force)
            .map_err(|source| AccessError::Files {
                path: self.managed.directory.clone(),
                source,
            })?;
        if !outcome.written.is_empty() || !outcome.removed.is_empty() {
            tracing::info!(version = inner.persisted.policy.version, written = ?outcome.written, removed = ?outcome.removed, "access enforced");
        }
        if self.settings.terminate_sessions {
            if let Some(previous) = &inner.in_force {
                for login in logins_that_lost_a_key(previous, &in_force) {
                    // Running `loginctl` and `pkill` blocks: never on the
                    // caller's task (the session loop applies policies).
                    match tokio::runtime::Handle::try_current() {
                        Ok(runtime) => {
                            runtime.spawn_blocking(move || terminate_sessions_of(&login));
                        }
                        Err(_) => terminate_sessions_of(&login),
                    }
                }
            }
        }
        inner.in_force = Some(in_force);
        Ok(())
    }

    /// Asks for a scan of the files on disk (at most one runs at a time;
    /// requests made meanwhile are served by one more scan).
    pub fn request_scan(&self) {
        self.scan_wanted.notify_one();
    }

    /// Changes after each finished scan.
    pub fn scans_done(&self) -> watch::Receiver<u64> {
        self.scans_done.subscribe()
    }

    /// What to tell the server: the applied version, and what the latest
    /// scan found for the logins of that version. Never reads a file.
    /// `None` when unchanged since the last call (unless `always`).
    pub fn state_to_report(&self, always: bool) -> Option<AccessState> {
        let mut inner = self.lock();
        let mut state = AccessState {
            applied_version: inner.persisted.policy.version,
            refused: inner
                .persisted
                .refused
                .iter()
                .map(refusal_to_proto)
                .collect(),
            ..AccessState::default()
        };
        for login in inner.persisted.policy.logins.keys() {
            let Some(login_findings) = inner.findings.get(login) else {
                continue;
            };
            if login_findings.missing {
                state.missing_logins.push(login.clone());
            }
            state
                .found
                .extend(login_findings.files.iter().map(found_keys));
        }
        if !always && inner.last_sent.as_ref() == Some(&state) {
            return None;
        }
        inner.last_sent = Some(state.clone());
        Some(state)
    }

    /// Scans whenever asked, until shutdown.
    async fn scan_when_asked(&self, shutdown: &CancellationToken) {
        let mut scanner =
            DiskScanner::new(self.managed.clone(), Arc::clone(&self.logins), READ_TIMEOUT);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.scan_wanted.notified() => {}
            }
            let logins: Vec<String> = self
                .lock()
                .persisted
                .policy
                .logins
                .keys()
                .cloned()
                .collect();
            let findings = scanner.scan(logins).await;
            {
                let mut inner = self.lock();
                log_new_refusals(&inner.findings, &findings);
                inner.findings = findings;
            }
            self.scans_done
                .send_modify(|done| *done = done.wrapping_add(1));
        }
    }

    /// Enforces at every expiry and fail-closed deadline, whether or not
    /// the server is reachable, and scans the files when asked, until
    /// shutdown.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::join!(
            self.enforce_at_deadlines(&shutdown),
            self.scan_when_asked(&shutdown)
        );
    }

    async fn enforce_at_deadlines(&self, shutdown: &CancellationToken) {
        loop {
            let now = unix_now();
            let next = {
                let inner = self.lock();
                next_change_after(
                    &inner.persisted.policy,
                    now,
                    self.settings.on_disconnect,
                    inner.persisted.contact(now),
                )
            };
            let sleep = next
                .map(|at| Duration::from_secs(u64::try_from(at - now).unwrap_or(0)))
                .unwrap_or(ENFORCER_MAX_SLEEP)
                .min(ENFORCER_MAX_SLEEP);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
            if let Err(error) = self.enforce(unix_now()) {
                tracing::error!(%error, "access enforcement failed");
            }
        }
    }
}

impl AccessHandler for AccessEnforcer {
    fn apply(&self, policy: &AccessPolicy) -> Option<AccessState> {
        match self.receive(local_policy(policy), unix_now()) {
            Ok(true) => tracing::info!(version = policy.version, "access policy applied"),
            Ok(false) => {}
            Err(error) => {
                tracing::error!(%error, version = policy.version, "cannot apply the access policy");
                return None;
            }
        }
        self.state_to_report(true)
    }

    fn set_contact(&self, connected: bool) {
        self.record_contact(connected, unix_now());
    }

    fn on_report(&self) {
        self.record_contact(true, unix_now());
        self.request_scan();
    }

    fn news_signal(&self) -> Option<watch::Receiver<u64>> {
        Some(self.scans_done())
    }

    fn news(&self) -> Option<AccessState> {
        self.state_to_report(false)
    }
}

/// One file as the server sees it: its keys, or why it was not read.
fn found_keys(file: &files::FoundFile) -> FoundKeys {
    let (public_keys, not_read_reason) = match &file.contents {
        FileContents::Keys(public_keys) => (public_keys.clone(), String::new()),
        FileContents::NotRead(reason) => (Vec::new(), reason.clone()),
    };
    FoundKeys {
        login: file.login.clone(),
        source: file.source.clone(),
        public_keys,
        not_read_reason,
    }
}

fn refusal_to_proto(refusal: &Refusal) -> AccessRefusal {
    AccessRefusal {
        login: refusal.login.clone(),
        user: refusal.user.clone(),
        grant_id: refusal.grant_id.clone(),
        key: refusal.key.clone(),
        reason: refusal.reason.clone(),
    }
}

/// Logs what the boundary refused (when that changes, not at every policy).
fn log_refusals(refused: &[Refusal]) {
    for refusal in refused {
        tracing::warn!(login = %refusal.login, user = %refusal.user, grant = %refusal.grant_id, key = %refusal.key, reason = %refusal.reason, "refused a key of the access policy");
    }
}

/// Logs each file refused now that was not refused (for the same reason)
/// at the previous scan: once per change, not at every report.
fn log_new_refusals(before: &Findings, after: &Findings) {
    let refusals = |findings: &Findings| -> Vec<(String, String)> {
        findings
            .values()
            .flat_map(|login| &login.files)
            .filter_map(|file| match &file.contents {
                FileContents::NotRead(reason) => Some((file.source.clone(), reason.clone())),
                FileContents::Keys(_) => None,
            })
            .collect()
    };
    let known = refusals(before);
    for (source, reason) in refusals(after) {
        if !known.contains(&(source.clone(), reason.clone())) {
            tracing::warn!(%source, %reason, "a key file of a managed login was not read");
        }
    }
}

/// Whether to record (and persist) contact news: a change of connection,
/// or, while connected, a refresh at most every [`CONTACT_PERSIST_EVERY`].
/// While disconnected the time of the last contact must stay put: failed
/// reconnects are not contact, or fail-closed would never come.
pub fn contact_update_due(persisted: &PersistedAccess, connected: bool, now: i64) -> bool {
    persisted.connected != connected
        || (connected && now.saturating_sub(persisted.last_contact_at) >= CONTACT_PERSIST_EVERY)
}

/// Logins whose set of keys in force lost at least one key.
pub fn logins_that_lost_a_key(
    before: &BTreeMap<String, Vec<LocalKey>>,
    after: &BTreeMap<String, Vec<LocalKey>>,
) -> Vec<String> {
    before
        .iter()
        .filter(|(login, keys)| {
            let remaining = after.get(*login);
            keys.iter().any(|key| {
                remaining.is_none_or(|remaining| {
                    !remaining
                        .iter()
                        .any(|kept| kept.public_key == key.public_key)
                })
            })
        })
        .map(|(login, _)| login.clone())
        .collect()
}

/// Ends the live SSH sessions of `login`: `loginctl terminate-user` where
/// systemd-logind tracks them, then SIGKILL to the login's own `sshd`
/// session processes (`pkill -KILL -u LOGIN -x sshd`), which closes every
/// connection of that login whatever key it used.
fn terminate_sessions_of(login: &str) {
    if !files::is_safe_login(login) {
        return;
    }
    let _ = std::process::Command::new("loginctl")
        .args(["terminate-user", login])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match std::process::Command::new("pkill")
        .args(["-KILL", "-u", login, "-x", "sshd"])
        .status()
    {
        Ok(status) => {
            tracing::warn!(%login, killed = status.success(), "ended the live sessions of a login that lost access")
        }
        Err(error) => tracing::error!(%login, %error, "cannot end the sessions of a login (pkill)"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn key(text: &str) -> LocalKey {
        LocalKey {
            public_key: text.into(),
            user: "u".into(),
            grant_id: "g".into(),
            expires_at: None,
        }
    }

    #[test]
    fn sessions_end_only_for_logins_that_lost_a_key() {
        let before = BTreeMap::from([
            ("alice".to_owned(), vec![key("A"), key("B")]),
            ("bob".to_owned(), vec![key("C")]),
            ("carol".to_owned(), vec![key("D")]),
        ]);
        let after = BTreeMap::from([
            ("alice".to_owned(), vec![key("A")]),
            ("carol".to_owned(), vec![key("D"), key("E")]),
        ]);
        assert_eq!(
            logins_that_lost_a_key(&before, &after),
            vec!["alice", "bob"]
        );
    }

    #[test]
    fn failed_reconnects_never_refresh_the_last_contact() {
        let away = PersistedAccess {
            policy: LocalPolicy::default(),
            refused: Vec::new(),
            connected: false,
            last_contact_at: 1_000,
        };
        assert!(!contact_update_due(&away, false, 1_001));
        assert!(!contact_update_due(&away, false, 100_000));
        assert!(contact_update_due(&away, true, 1_001));
        let here = PersistedAccess {
            connected: true,
            ..away
        };
        assert!(!contact_update_due(&here, true, 1_059));
        assert!(contact_update_due(&here, true, 1_060));
        assert!(contact_update_due(&here, false, 1_001));
    }

    #[test]
    fn a_stale_connected_flag_counts_as_disconnected_since_last_contact() {
        let state = PersistedAccess {
            policy: LocalPolicy::default(),
            refused: Vec::new(),
            connected: true,
            last_contact_at: 1_000,
        };
        assert_eq!(state.contact(1_100).disconnected_since, None);
        assert_eq!(state.contact(1_000 + 181).disconnected_since, Some(1_000));
        let away = PersistedAccess {
            connected: false,
            ..state
        };
        assert_eq!(away.contact(1_001).disconnected_since, Some(1_000));
    }

    #[test]
    fn the_authorized_keys_command_answers_from_the_persisted_policy_with_expiry() {
        let data_dir = std::env::temp_dir().join(format!("flotte-akc-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&data_dir).unwrap();
        let mut expiring = key("ssh-ed25519 OLD");
        expiring.expires_at = Some(500);
        let state = PersistedAccess {
            policy: LocalPolicy {
                version: 3,
                logins: BTreeMap::from([(
                    "alice".to_owned(),
                    vec![key("ssh-ed25519 NEW"), expiring],
                )]),
            },
            refused: Vec::new(),
            connected: false,
            last_contact_at: 100,
        };
        std::fs::write(state_path(&data_dir), serde_json::to_vec(&state).unwrap()).unwrap();
        let before = authorized_keys_for(&data_dir, OnDisconnect::Keep, "alice", 400).unwrap();
        assert!(before.contains("ssh-ed25519 NEW") && before.contains("ssh-ed25519 OLD"));
        let after = authorized_keys_for(&data_dir, OnDisconnect::Keep, "alice", 500).unwrap();
        assert!(after.contains("ssh-ed25519 NEW") && !after.contains("OLD"));
        let closed = authorized_keys_for(
            &data_dir,
            OnDisconnect::FailClosedAfter(Duration::from_secs(60)),
            "alice",
            400,
        )
        .unwrap();
        assert_eq!(closed, "");
        assert_eq!(
            authorized_keys_for(&data_dir, OnDisconnect::Keep, "bob", 400).unwrap(),
            ""
        );
        std::fs::remove_dir_all(&data_dir).unwrap();
    }
}
