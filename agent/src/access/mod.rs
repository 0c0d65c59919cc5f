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
//! done, so no file can stop a revocation from being applied. The user
//! database (NSS: LDAP, sssd…) is never read on the session loop either: a
//! policy received is applied at once narrowed to what is installed (a
//! revocation takes effect before anything is looked up), then screened
//! whole by the boundary once its logins are looked up on the blocking pool
//! with a time bound; only then is its version acknowledged.

pub mod boundary;
pub mod bounded;
pub mod files;
pub mod policy;
pub mod scan;
pub mod settings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use flotte_proto::v1::{AccessPolicy, AccessRefusal, AccessState, FoundKeys};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::boundary::{
    screen, AllowedLogins, Boundary, LookedUp, Refusal, UidRange, LOGIN_DEFS, MAX_REFUSALS,
};
use self::bounded::{BoundedCalls, CallOutcome};
use self::files::{
    is_safe_login, FileContents, LoginAccount, LoginDirectory, ManagedDirectory, SystemLogins,
};
use self::policy::{
    authorized_keys_text, keys_in_force, narrowed_to_installed, next_change_after, should_apply,
    Contact, LocalKey, LocalPolicy, OnDisconnect,
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
/// Longest the screening of a policy waits for the user database to answer
/// for one login; a login without an answer gets no new key.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
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
    /// Since when the server is considered away at `now`, as another
    /// process reading the file sees it (`authorized-keys`): a "connected"
    /// left by an agent killed while connected is believed for only
    /// [`CONTACT_STALE_AFTER`].
    pub fn contact(&self, now: i64) -> Contact {
        let believed_connected =
            self.connected && now.saturating_sub(self.last_contact_at) <= CONTACT_STALE_AFTER;
        Contact {
            disconnected_since: (!believed_connected).then_some(self.last_contact_at),
        }
    }
}

impl PersistedAccess {
    /// Since when the server is away, as the running agent knows it: it
    /// records each connection and each loss itself (a dead connection is
    /// found by keepalive within seconds), so its own flag is the truth,
    /// whatever the wall clock does. A jump of the clock while connected is
    /// not hours without contact.
    fn live_contact(&self) -> Contact {
        Contact {
            disconnected_since: (!self.connected).then_some(self.last_contact_at),
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
    /// The latest policy from the server (at start, the persisted one): what
    /// the screener screens whole.
    latest: LocalPolicy,
    /// Counts the policies received: a screening of an older one is
    /// dropped (it could give back a key revoked since).
    generation: u64,
    /// Refusals persisted before this start, kept until the server's first
    /// policy replaces them (the persisted policy holds only what passed).
    refused_before_start: Vec<Refusal>,
}

/// The running enforcement: one per agent, shared by the session (which
/// hands it policies) and its own expiry timer task.
pub struct AccessEnforcer {
    settings: AccessSettings,
    boundary: Boundary,
    data_dir: PathBuf,
    managed: ManagedDirectory,
    logins: Arc<dyn LoginDirectory>,
    lookup_timeout: Duration,
    inner: Mutex<Inner>,
    wake: tokio::sync::Notify,
    scan_wanted: tokio::sync::Notify,
    screen_wanted: tokio::sync::Notify,
    /// The last screening had a login without an answer: screen again at
    /// the next report, so that it gets its keys once the database answers.
    screen_again_at_report: AtomicBool,
    /// Counts finished scans and screenings; the session waits on it for
    /// news to report.
    news: watch::Sender<u64>,
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
    /// happened while the agent was down takes effect before any session),
    /// with the system's user database.
    pub fn open(settings: AccessSettings, data_dir: &Path) -> Result<Arc<Self>, AccessError> {
        Self::open_with_logins(settings, data_dir, Arc::new(SystemLogins), LOOKUP_TIMEOUT)
    }

    /// [`AccessEnforcer::open`] with `logins` as the user database, each
    /// lookup waited for at most `lookup_timeout`. The persisted policy is
    /// screened again: by names at once (the boundary may have narrowed
    /// since it was applied), whole once `run` has looked its logins up (a
    /// wider boundary takes effect with the server's next policy).
    pub fn open_with_logins(
        settings: AccessSettings,
        data_dir: &Path,
        logins: Arc<dyn LoginDirectory>,
        lookup_timeout: Duration,
    ) -> Result<Arc<Self>, AccessError> {
        let mut persisted = load_state(data_dir)?;
        // A starting agent is not connected until its session says so,
        // whatever the file says (it may have been killed while connected).
        persisted.connected = false;
        let boundary = Boundary {
            allowed: settings.allowed_logins.clone(),
            people_uids: UidRange::of_this_machine(Path::new(LOGIN_DEFS)),
        };
        let latest = persisted.policy.clone();
        let (policy, newly_refused) = screen(
            &persisted.policy,
            &boundary,
            &|_| LookedUp::NotAsked,
            &persisted.policy,
        );
        persisted.policy = policy;
        persisted.refused.extend(newly_refused);
        persisted.refused.truncate(MAX_REFUSALS);
        let enforcer = Arc::new(AccessEnforcer {
            managed: ManagedDirectory::new(&settings.authorized_keys_dir),
            settings,
            boundary,
            data_dir: data_dir.to_owned(),
            logins,
            lookup_timeout,
            inner: Mutex::new(Inner {
                refused_before_start: persisted.refused.clone(),
                persisted,
                in_force: None,
                last_sent: None,
                findings: Findings::new(),
                latest,
                generation: 0,
            }),
            wake: tokio::sync::Notify::new(),
            scan_wanted: tokio::sync::Notify::new(),
            screen_wanted: tokio::sync::Notify::new(),
            screen_again_at_report: AtomicBool::new(false),
            news: watch::Sender::new(0),
        });
        for problem in enforcer.managed.strict_modes_problems() {
            tracing::warn!(%problem, "sshd StrictModes would refuse the managed authorized_keys files");
        }
        enforcer.enforce(unix_now())?;
        enforcer.request_scan();
        enforcer.screen_wanted.notify_one();
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

    /// Takes `policy` from the server if it is newer (or the same version
    /// recompiled for new labels): applies at once what it removes or
    /// shortens of the installed keys, without looking anything up, and
    /// leaves the rest to the screener (`run`), which installs and
    /// acknowledges it once its logins are looked up. True if something
    /// was removed at once.
    pub fn receive(&self, policy: LocalPolicy, now: i64) -> Result<bool, AccessError> {
        let narrowed = {
            let mut inner = self.lock();
            if !should_apply(&inner.latest, &policy) {
                drop(inner);
                // The same policy again (a reconnection): look again, the
                // user database may have changed.
                self.screen_wanted.notify_one();
                return Ok(false);
            }
            inner.generation = inner.generation.wrapping_add(1);
            inner.refused_before_start.clear();
            let narrowed = narrowed_to_installed(&policy, &inner.persisted.policy);
            inner.latest = policy;
            let changed = narrowed != inner.persisted.policy;
            if changed {
                inner.persisted.policy = narrowed;
                inner.persisted.connected = true;
                inner.persisted.last_contact_at = now;
                self.persist(&inner.persisted)?;
            }
            changed
        };
        if narrowed {
            self.enforce(now)?;
            self.wake.notify_one();
        }
        self.screen_wanted.notify_one();
        Ok(narrowed)
    }

    /// Installs the screened `policy` of `generation` unless a newer policy
    /// arrived meanwhile; true if it changed what is installed.
    fn install(
        &self,
        generation: u64,
        policy: LocalPolicy,
        mut refused: Vec<Refusal>,
        now: i64,
    ) -> Result<bool, AccessError> {
        {
            let mut inner = self.lock();
            if inner.generation != generation {
                return Ok(false);
            }
            for earlier in &inner.refused_before_start {
                if !refused.contains(earlier) {
                    refused.push(earlier.clone());
                }
            }
            refused.truncate(MAX_REFUSALS);
            let refusals_changed = inner.persisted.refused != refused;
            if !should_apply(&inner.persisted.policy, &policy) && !refusals_changed {
                return Ok(false);
            }
            if refusals_changed {
                log_refusals(&refused);
            }
            inner.persisted.policy = policy;
            inner.persisted.refused = refused;
            self.persist(&inner.persisted)?;
        }
        self.enforce(now)?;
        self.wake.notify_one();
        self.request_scan();
        Ok(true)
    }

    /// Screens the latest policy whenever asked, until shutdown: looks its
    /// logins up (bounded), screens, installs.
    async fn screen_when_asked(&self, shutdown: &CancellationToken) {
        let mut lookups = BoundedCalls::new(self.lookup_timeout);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.screen_wanted.notified() => {}
            }
            let (generation, latest) = {
                let inner = self.lock();
                (inner.generation, inner.latest.clone())
            };
            let looked_up = self.look_up(&mut lookups, &latest).await;
            let unanswered = looked_up
                .values()
                .any(|answer| matches!(answer, LookedUp::NoAnswer(_)));
            self.screen_again_at_report
                .store(unanswered, Ordering::Relaxed);
            let answer_of = |login: &str| {
                looked_up
                    .get(login)
                    .cloned()
                    .unwrap_or_else(|| LookedUp::NoAnswer("the login was not looked up".to_owned()))
            };
            // Installed now: screened when installed, so a login without an
            // answer keeps it (the generation check below makes sure no
            // revocation came in between).
            let installed = narrowed_to_installed(&latest, &self.lock().persisted.policy);
            let (screened, refused) = screen(&latest, &self.boundary, &answer_of, &installed);
            let version = screened.version;
            match self.install(generation, screened, refused, unix_now()) {
                Ok(true) => tracing::info!(version, "access policy applied"),
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(%error, version, "cannot apply the access policy")
                }
            }
            self.news.send_modify(|news| *news = news.wrapping_add(1));
        }
    }

    /// What the user database says of each login of `policy` (none asked
    /// when the boundary decides by names).
    async fn look_up(
        &self,
        lookups: &mut BoundedCalls<Option<LoginAccount>>,
        policy: &LocalPolicy,
    ) -> BTreeMap<String, LookedUp> {
        if !self.boundary.needs_lookups() {
            return policy
                .logins
                .keys()
                .map(|login| (login.clone(), LookedUp::NotAsked))
                .collect();
        }
        let timeout = humantime::format_duration(lookups.timeout());
        let directory = Arc::clone(&self.logins);
        let logins = policy
            .logins
            .keys()
            .filter(|login| is_safe_login(login))
            .cloned();
        lookups
            .call_each(logins, move |login| directory.account_of(login))
            .await
            .into_iter()
            .map(|(login, outcome)| {
                let answer = match outcome {
                    CallOutcome::Answered(Some(account)) => LookedUp::Account(account),
                    CallOutcome::Answered(None) => LookedUp::Unknown,
                    CallOutcome::Failed(error) => LookedUp::NoAnswer(format!(
                        "the lookup of the login in the user database failed ({error}); no new key until it answers"
                    )),
                    CallOutcome::NoAnswerSince(since) => LookedUp::NoAnswer(format!(
                        "the user database gave no answer for this login within {timeout} (asked at {}); no new key until it answers",
                        humantime::format_rfc3339_seconds(since)
                    )),
                    CallOutcome::NotTried { blocked } => LookedUp::NoAnswer(format!(
                        "not looked up: {blocked} lookups in the user database are still unanswered; no new key until they answer"
                    )),
                };
                (login, answer)
            })
            .collect()
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
        let contact = inner.persisted.live_contact();
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

    /// Changes after each finished scan and screening.
    pub fn news_done(&self) -> watch::Receiver<u64> {
        self.news.subscribe()
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
            self.news.send_modify(|news| *news = news.wrapping_add(1));
        }
    }

    /// Enforces at every expiry and fail-closed deadline, whether or not
    /// the server is reachable, screens policies and scans the files when
    /// asked, until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::join!(
            self.enforce_at_deadlines(&shutdown),
            self.screen_when_asked(&shutdown),
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
                    inner.persisted.live_contact(),
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
            Ok(true) => tracing::info!(
                version = policy.version,
                "access narrowed at once to what the new policy still grants; the rest once its logins are looked up"
            ),
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
        if self.screen_again_at_report.load(Ordering::Relaxed) {
            self.screen_wanted.notify_one();
        }
    }

    fn news_signal(&self) -> Option<watch::Receiver<u64>> {
        Some(self.news_done())
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

    /// A user database that answers at once until `stall` is set, then
    /// never (until the test ends and drops the sender), as a hung LDAP or
    /// sssd would.
    struct StallingLogins {
        stall: AtomicBool,
        stalled: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl LoginDirectory for StallingLogins {
        fn account_of(&self, _login: &str) -> Option<LoginAccount> {
            if self.stall.load(Ordering::SeqCst) {
                let _ = self.stalled.lock().map(|receiver| receiver.recv());
            }
            Some(LoginAccount {
                home: PathBuf::from("/nonexistent"),
                uid: UidRange::of_this_machine(Path::new(LOGIN_DEFS)).min,
                shell: PathBuf::from("/bin/sh"),
            })
        }
    }

    const ALICE_KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKvkDk0qYpGPzoRl3X27cRHkeu9MS8y63dSFMpU6xIuH";
    const BOB_KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINpvAXiztNTetQLK6xRzciVEKbTwfINuABqNK9qXq8E2";

    fn policy_of(version: u64, logins: &[(&str, &str)]) -> LocalPolicy {
        LocalPolicy {
            version,
            logins: logins
                .iter()
                .map(|(login, public_key)| ((*login).to_owned(), vec![key(public_key)]))
                .collect(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_applies_at_once_while_the_user_database_never_answers() {
        let root = std::env::temp_dir().join(format!("flotte-lookup-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&root).unwrap();
        let (never, stalled) = std::sync::mpsc::channel::<()>();
        let logins = Arc::new(StallingLogins {
            stall: AtomicBool::new(false),
            stalled: Mutex::new(stalled),
        });
        let settings = AccessSettings {
            authorized_keys_dir: root.join("managed"),
            terminate_sessions: false,
            on_disconnect: OnDisconnect::Keep,
            allowed_logins: AllowedLogins::PeopleOnly,
        };
        let lookup_timeout = Duration::from_secs(2);
        let enforcer = AccessEnforcer::open_with_logins(
            settings,
            &root,
            Arc::clone(&logins) as Arc<dyn LoginDirectory>,
            lookup_timeout,
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(Arc::clone(&enforcer).run(shutdown.clone()));
        let managed = |login: &str| root.join("managed").join(login);
        // Receives `policy` and waits until its version is acknowledged.
        let screened = |policy: LocalPolicy| {
            let enforcer = Arc::clone(&enforcer);
            let mut news = enforcer.news_done();
            async move {
                let version = policy.version;
                enforcer.receive(policy, 1).unwrap();
                let acknowledged = async {
                    while enforcer.applied_version() != version {
                        news.changed().await.unwrap();
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), acknowledged)
                    .await
                    .unwrap();
            }
        };

        // Answering: both logins installed once looked up, version acknowledged.
        screened(policy_of(1, &[("alice", ALICE_KEY), ("bob", BOB_KEY)])).await;
        assert!(managed("alice").exists() && managed("bob").exists());

        // The user database hangs for good; alice is revoked: her file and
        // her persisted keys are gone when `receive` returns, long before
        // any lookup could have timed out.
        logins.stall.store(true, Ordering::SeqCst);
        let started = std::time::Instant::now();
        assert!(enforcer
            .receive(policy_of(2, &[("bob", BOB_KEY)]), 2)
            .unwrap());
        assert!(
            started.elapsed() < lookup_timeout / 2,
            "{:?}",
            started.elapsed()
        );
        assert!(!managed("alice").exists());
        assert_eq!(
            authorized_keys_for(&root, OnDisconnect::Keep, "alice", 2).unwrap(),
            ""
        );
        assert!(authorized_keys_for(&root, OnDisconnect::Keep, "bob", 2)
            .unwrap()
            .contains(BOB_KEY));

        // Screened without an answer: bob keeps what he had, version 2 is
        // acknowledged; a login added meanwhile gets nothing and says why.
        let mut news = enforcer.news_done();
        while enforcer.applied_version() != 2 {
            tokio::time::timeout(Duration::from_secs(10), news.changed())
                .await
                .unwrap()
                .unwrap();
        }
        assert!(managed("bob").exists());
        screened(policy_of(3, &[("bob", BOB_KEY), ("carol", ALICE_KEY)])).await;
        assert!(!managed("carol").exists());
        let state = enforcer.state_to_report(true).unwrap();
        assert_eq!(state.applied_version, 3);
        let refused: Vec<(&str, &str)> = state
            .refused
            .iter()
            .map(|refusal| (refusal.login.as_str(), refusal.reason.as_str()))
            .collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, "carol");
        assert!(
            refused[0].1.contains("no answer for this login within 2s"),
            "{refused:?}"
        );
        // Revoking bob too still needs no answer.
        assert!(enforcer.receive(policy_of(4, &[]), 4).unwrap());
        assert!(!managed("bob").exists());

        shutdown.cancel();
        drop(never);
        running.await.unwrap();
        std::fs::remove_dir_all(&root).unwrap();
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
            ..state.clone()
        };
        assert_eq!(away.contact(1_001).disconnected_since, Some(1_000));
        // The running agent believes its own flag: hours of wall-clock
        // jump while connected are not hours without contact.
        assert_eq!(state.live_contact().disconnected_since, None);
        assert_eq!(away.live_contact().disconnected_since, Some(1_000));
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
