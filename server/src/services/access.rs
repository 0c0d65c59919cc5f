//! People's access: users, their keys and grants, where each policy version
//! stands on the fleet, and the who-has-access report. Every committed
//! change is handed to the publisher, which recompiles and pushes each
//! connected machine's policy before the call answers. Off-boarding removes
//! a user's grants and keys and revokes the operator of the same name, in
//! one call. Agents' access acknowledgements are bounded here and kept in
//! memory by the hub (flushed to the store in batches).

use std::collections::{HashMap, HashSet};

use flotte_proto::labels::Selector;
use flotte_proto::ssh_keys::{fingerprint_of_key_text, parse_public_key, SshPublicKey};
use uuid::Uuid;

use crate::domain::access::{
    access_report, compile_policy, delivery_status, parse_expiry, validate_login,
    validate_user_name, AccessError, DeliveryStatus, ReportRow,
};
use crate::services::machines::{find_machine, MachineError};
use crate::services::operators;
use crate::store::{
    FoundKeysRecord, GrantRecord, MachineAccessRecord, MachineRecord, RefusedKeyRecord, StoreError,
    UserKeyRecord, UserRecord, UserRevocation,
};
use crate::ServerState;

/// Bounds on what one agent may report (its message is bounded too).
const MAX_REPORTED_LOGINS: usize = 1024;
const MAX_REPORTED_KEYS_PER_FILE: usize = 1024;
/// Refusals kept per machine (the agent keeps at most 256).
const MAX_REPORTED_REFUSALS: usize = 256;
/// Longest reason, key label or source kept from an agent's report.
const MAX_REPORTED_TEXT_CHARS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum AccessServiceError {
    /// Every invalid name, login, selector or expiry of one request, together.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<AccessError>),
    #[error("SSH public key refused: {0}")]
    KeyRefused(String),
    /// Every refused key of one request (`key N: why`), together.
    #[error("SSH public keys refused: {}", .0.join("; "))]
    KeysRefused(Vec<String>),
    #[error("no user named {0}")]
    NoSuchUser(String),
    #[error("user {name} was revoked at {}; names are not reused", crate::store::rfc3339(*.revoked_at))]
    UserRevoked { name: String, revoked_at: i64 },
    #[error("user {user} has no key {fingerprint}")]
    NoSuchKey { user: String, fingerprint: String },
    #[error("no grant with id {0}")]
    NoSuchGrant(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<AccessError> for AccessServiceError {
    fn from(error: AccessError) -> Self {
        AccessServiceError::Invalid(vec![error])
    }
}

impl From<StoreError> for AccessServiceError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::AlreadyExists(what) => AccessServiceError::AlreadyExists(what),
            other => AccessServiceError::Store(other),
        }
    }
}

/// A grant with the number of in-service machines its selector matches now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchedGrant {
    pub grant: GrantRecord,
    pub machines: u32,
}

/// A user with its keys and grants, from one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAccess {
    pub user: UserRecord,
    pub keys: Vec<UserKeyRecord>,
    pub grants: Vec<MatchedGrant>,
}

/// What a grant request asks, as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGrant {
    pub user: String,
    pub selector: String,
    pub login: String,
    /// RFC 3339 UTC, or empty for a grant that never expires.
    pub expires: String,
}

/// Where one machine stands with a policy version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineDelivery {
    pub machine_id: Uuid,
    pub hostname: String,
    pub status: DeliveryStatus,
    pub applied_version: u64,
    pub applied_at: i64,
    /// Keys or logins of the policy the agent refused to install.
    pub refused: u32,
}

/// Where a policy version stands on the in-service fleet, by hostname.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessStatus {
    pub version: u64,
    pub current_version: u64,
    pub applied: u32,
    pub pending: u32,
    pub unreachable: u32,
    pub machines: Vec<MachineDelivery>,
}

/// One line of the who-has-access report, with the machine it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineReportRow {
    pub machine_id: Uuid,
    pub hostname: String,
    pub fingerprint: String,
    pub key_type: String,
    pub row: ReportRow,
}

/// What kind of problem an agent reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessProblemKind {
    /// A key or login of the policy its own boundary refused to install.
    Refused,
    /// A key file it could not read (its keys are unknown).
    NotRead,
}

impl AccessProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessProblemKind::Refused => "refused",
            AccessProblemKind::NotRead => "not-read",
        }
    }
}

/// One problem an agent reported, with the machine it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessProblem {
    pub machine_id: Uuid,
    pub hostname: String,
    pub login: String,
    pub kind: AccessProblemKind,
    /// Refused: the key's user and grant; empty for not-read.
    pub user: String,
    pub grant_id: String,
    /// Refused: the key's fingerprint (or a prefix); not-read: the file.
    pub subject: String,
    pub reason: String,
}

/// The who-has-access report: rows, logins machines reported missing
/// (`hostname: login`), and what the agents refused or could not read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessReport {
    pub rows: Vec<MachineReportRow>,
    pub missing_logins: Vec<String>,
    pub problems: Vec<AccessProblem>,
}

/// What an agent reported about access on its machine, unbounded as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportedAccess {
    pub applied_version: u64,
    pub missing_logins: Vec<String>,
    pub found: Vec<FoundKeysRecord>,
    pub refused: Vec<RefusedKeyRecord>,
}

/// What off-boarding did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offboarded {
    pub revocation: UserRevocation,
    /// The policy version that carries the removal.
    pub policy_version: u64,
    /// What happened to the operator of the same name, in words.
    pub operator: String,
}

fn parse_key(text: &str) -> Result<SshPublicKey, AccessServiceError> {
    parse_public_key(text).map_err(|error| AccessServiceError::KeyRefused(error.to_string()))
}

fn key_record(user: &str, key: &SshPublicKey, now: i64) -> UserKeyRecord {
    UserKeyRecord {
        user: user.to_owned(),
        fingerprint: key.fingerprint(),
        key_type: key.key_type.clone(),
        public_key: key.key_text(),
        comment: key.comment.clone(),
        added_at: now,
    }
}

/// The keys of a new user, every unparseable or repeated one reported
/// together (`key N` counts from one, as the operator wrote them).
fn new_user_keys(
    user: &str,
    key_texts: &[String],
    now: i64,
) -> Result<Vec<UserKeyRecord>, AccessServiceError> {
    let mut keys: Vec<UserKeyRecord> = Vec::new();
    let mut problems = Vec::new();
    for (index, text) in key_texts.iter().enumerate() {
        match parse_public_key(text) {
            Ok(key)
                if keys
                    .iter()
                    .any(|known| known.fingerprint == key.fingerprint()) =>
            {
                problems.push(format!("key {}: the same key is given twice", index + 1));
            }
            Ok(key) => keys.push(key_record(user, &key, now)),
            Err(error) => problems.push(format!("key {}: {error}", index + 1)),
        }
    }
    if problems.is_empty() {
        Ok(keys)
    } else {
        Err(AccessServiceError::KeysRefused(problems))
    }
}

/// The fingerprint an operator means: given as `SHA256:…`, or as the key.
fn fingerprint_meant(key_or_fingerprint: &str) -> Result<String, AccessServiceError> {
    let trimmed = key_or_fingerprint.trim();
    if trimmed.starts_with("SHA256:") {
        Ok(trimmed.to_owned())
    } else {
        Ok(parse_key(key_or_fingerprint)?.fingerprint())
    }
}

/// How many in-service machines `selector` matches (none if it does not parse).
fn machines_matching(selector: &str, machines: &[MachineRecord]) -> u32 {
    let Ok(selector) = Selector::parse(selector) else {
        return 0;
    };
    let count = machines
        .iter()
        .filter(|machine| machine.retired_at.is_none())
        .filter(|machine| {
            selector.matches(
                |key| machine.labels.get(key).map(String::as_str),
                &machine.zone,
            )
        })
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

fn matched(grant: GrantRecord, machines: &[MachineRecord]) -> MatchedGrant {
    MatchedGrant {
        machines: machines_matching(&grant.selector, machines),
        grant,
    }
}

/// Every user (or only `only`) with keys and grants, from one snapshot.
pub async fn users(
    state: &ServerState,
    only: Option<&str>,
) -> Result<Vec<UserAccess>, AccessServiceError> {
    let snapshot = state.access.store().access_snapshot().await?;
    let machines = state.store.machines().await?;
    Ok(snapshot
        .users
        .iter()
        .filter(|user| only.is_none_or(|name| user.name == name))
        .map(|user| UserAccess {
            user: user.clone(),
            keys: snapshot
                .keys
                .iter()
                .filter(|key| key.user == user.name)
                .cloned()
                .collect(),
            grants: snapshot
                .grants
                .iter()
                .filter(|grant| grant.user == user.name)
                .map(|grant| matched(grant.clone(), &machines))
                .collect(),
        })
        .collect())
}

/// The user `name` with keys and grants.
pub async fn user(state: &ServerState, name: &str) -> Result<UserAccess, AccessServiceError> {
    users(state, Some(name))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| AccessServiceError::NoSuchUser(name.to_owned()))
}

/// The user `name`, refusing unknown and off-boarded ones.
async fn active_user(state: &ServerState, name: &str) -> Result<UserRecord, AccessServiceError> {
    let snapshot = state.access.store().access_snapshot().await?;
    let user = snapshot
        .users
        .into_iter()
        .find(|user| user.name == name)
        .ok_or_else(|| AccessServiceError::NoSuchUser(name.to_owned()))?;
    if let Some(revoked_at) = user.revoked_at {
        return Err(AccessServiceError::UserRevoked {
            name: name.to_owned(),
            revoked_at,
        });
    }
    Ok(user)
}

/// Adds the user `name` with its keys (all valid, none repeated).
pub async fn add_user(
    state: &ServerState,
    name: &str,
    key_texts: &[String],
    created_by: &str,
) -> Result<UserAccess, AccessServiceError> {
    validate_user_name(name)?;
    let now = state.clock.now_unix();
    let keys = new_user_keys(name, key_texts, now)?;
    let user = UserRecord {
        name: name.to_owned(),
        created_at: now,
        created_by: created_by.to_owned(),
        revoked_at: None,
    };
    state.access.store().insert_user(&user, &keys).await?;
    state.publisher.access_changed().await?;
    self::user(state, name).await
}

/// Adds one key to an active user.
pub async fn add_user_key(
    state: &ServerState,
    name: &str,
    key_text: &str,
) -> Result<UserAccess, AccessServiceError> {
    active_user(state, name).await?;
    let key = parse_key(key_text)?;
    state
        .access
        .store()
        .insert_user_key(&key_record(name, &key, state.clock.now_unix()))
        .await?;
    state.publisher.access_changed().await?;
    user(state, name).await
}

/// Removes a user's key, named by its `SHA256:` fingerprint or by the key.
pub async fn remove_user_key(
    state: &ServerState,
    name: &str,
    key_or_fingerprint: &str,
) -> Result<UserAccess, AccessServiceError> {
    let fingerprint = fingerprint_meant(key_or_fingerprint)?;
    state
        .access
        .store()
        .remove_user_key(name, &fingerprint)
        .await?
        .ok_or_else(|| AccessServiceError::NoSuchKey {
            user: name.to_owned(),
            fingerprint,
        })?;
    state.publisher.access_changed().await?;
    user(state, name).await
}

/// Checks a grant request, every problem reported together: the login, the
/// selector, the expiry (`None`: never expires).
fn validated_grant(request: &NewGrant, now: i64) -> Result<Option<i64>, AccessServiceError> {
    let mut problems = Vec::new();
    if let Err(error) = validate_login(&request.login) {
        problems.push(error);
    }
    if let Err(error) = Selector::parse(&request.selector) {
        problems.push(AccessError::InvalidSelector {
            selector: request.selector.clone(),
            reason: error.to_string(),
        });
    }
    let expires_at = parse_expiry(&request.expires, now).unwrap_or_else(|error| {
        problems.push(error);
        None
    });
    if problems.is_empty() {
        Ok(expires_at)
    } else {
        Err(AccessServiceError::Invalid(problems))
    }
}

/// Grants an active user a login on the machines a selector matches.
pub async fn grant(
    state: &ServerState,
    request: NewGrant,
    created_by: &str,
) -> Result<MatchedGrant, AccessServiceError> {
    let now = state.clock.now_unix();
    let expires_at = validated_grant(&request, now)?;
    active_user(state, &request.user).await?;
    let record = GrantRecord {
        id: format!("g-{}", &Uuid::new_v4().simple().to_string()[..10]),
        user: request.user,
        selector: request.selector.trim().to_owned(),
        login: request.login,
        expires_at,
        created_at: now,
        created_by: created_by.to_owned(),
    };
    state.access.store().insert_grant(&record).await?;
    state.publisher.access_changed().await?;
    let machines = state.store.machines().await?;
    Ok(matched(record, &machines))
}

/// Removes the grant `id`.
pub async fn revoke_grant(
    state: &ServerState,
    id: &str,
) -> Result<MatchedGrant, AccessServiceError> {
    let (grant, _version) = state
        .access
        .store()
        .remove_grant(id)
        .await?
        .ok_or_else(|| AccessServiceError::NoSuchGrant(id.to_owned()))?;
    state.publisher.access_changed().await?;
    let machines = state.store.machines().await?;
    Ok(matched(grant, &machines))
}

/// Every grant, or only those of `user`.
pub async fn grants(
    state: &ServerState,
    user: Option<&str>,
) -> Result<Vec<MatchedGrant>, AccessServiceError> {
    let snapshot = state.access.store().access_snapshot().await?;
    let machines = state.store.machines().await?;
    Ok(snapshot
        .grants
        .into_iter()
        .filter(|grant| user.is_none_or(|user| grant.user == user))
        .map(|grant| matched(grant, &machines))
        .collect())
}

/// Where policy `version` (`None`: the current one) stands on every
/// in-service machine.
pub async fn access_status(
    state: &ServerState,
    version: Option<u64>,
) -> Result<AccessStatus, AccessServiceError> {
    let current_version = state.access.current().version;
    let version = version.unwrap_or(current_version);
    // Machines held by other replicas: their acknowledgements as those
    // replicas last flushed them; this replica's own are the freshest.
    let mut acks: HashMap<Uuid, MachineAccessRecord> = state
        .access
        .store()
        .machine_access()
        .await?
        .into_iter()
        .map(|record| (record.machine_id, record))
        .collect();
    acks.extend(state.access.machines());
    let mut connected: HashSet<Uuid> = state.registry.views().into_keys().collect();
    connected.extend(
        state
            .replica_store
            .live_session_holders()
            .await?
            .into_keys(),
    );
    let mut status = AccessStatus {
        version,
        current_version,
        applied: 0,
        pending: 0,
        unreachable: 0,
        machines: Vec::new(),
    };
    let mut machines = state.store.machines().await?;
    machines.retain(|machine| machine.retired_at.is_none());
    machines.sort_by(|a, b| a.inventory.hostname.cmp(&b.inventory.hostname));
    for machine in machines {
        let ack = acks.get(&machine.id);
        let applied_version = ack.map_or(0, |ack| ack.applied_version);
        let delivery = delivery_status(applied_version, version, connected.contains(&machine.id));
        match delivery {
            DeliveryStatus::Applied => status.applied += 1,
            DeliveryStatus::Pending => status.pending += 1,
            DeliveryStatus::Unreachable => status.unreachable += 1,
        }
        status.machines.push(MachineDelivery {
            machine_id: machine.id,
            hostname: machine.inventory.hostname,
            status: delivery,
            applied_version,
            applied_at: ack.map_or(0, |ack| ack.applied_at),
            refused: ack.map_or(0, |ack| {
                u32::try_from(ack.refused.len()).unwrap_or(u32::MAX)
            }),
        });
    }
    Ok(status)
}

fn key_type_of(public_key: &str) -> String {
    public_key
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Who has access where: granted keys next to the keys agents found, on
/// one machine (`machine`: id, id prefix or hostname) or every in-service
/// one, optionally only the rows of `user`.
pub async fn report(
    state: &ServerState,
    machine: Option<&str>,
    user: Option<&str>,
) -> Result<AccessReport, AccessServiceError> {
    let inputs = state.access.current();
    let all_machines = state.store.machines().await?;
    let machines: Vec<&MachineRecord> = match machine {
        None => all_machines
            .iter()
            .filter(|machine| machine.retired_at.is_none())
            .collect(),
        Some(key) => vec![find_machine(&all_machines, key)?],
    };
    let now = state.clock.now_unix();
    let mut report = AccessReport::default();
    for machine in machines {
        let policy = compile_policy(&inputs, &machine.labels, &machine.zone, now);
        let record = state.access.machine(machine.id).unwrap_or_default();
        let granted_fingerprints: HashMap<&str, &str> = policy
            .logins
            .values()
            .flatten()
            .map(|key| (key.public_key.as_str(), key.fingerprint.as_str()))
            .collect();
        for row in access_report(&policy, &record.found, &inputs.owner_by_key) {
            if user.is_some_and(|user| row.user.as_deref() != Some(user)) {
                continue;
            }
            let fingerprint = granted_fingerprints
                .get(row.public_key.as_str())
                .map(|fingerprint| (*fingerprint).to_owned())
                .or_else(|| fingerprint_of_key_text(&row.public_key))
                .unwrap_or_else(|| "(unparseable key)".to_owned());
            report.rows.push(MachineReportRow {
                machine_id: machine.id,
                hostname: machine.inventory.hostname.clone(),
                fingerprint,
                key_type: key_type_of(&row.public_key),
                row,
            });
        }
        report.missing_logins.extend(
            record
                .missing_logins
                .iter()
                .map(|login| format!("{}: {login}", machine.inventory.hostname)),
        );
        report.problems.extend(problems_of(machine, &record, user));
    }
    Ok(report)
}

/// What one machine's agent refused or could not read (only the refusals
/// of `user` when one is asked for).
fn problems_of(
    machine: &MachineRecord,
    record: &MachineAccessRecord,
    user: Option<&str>,
) -> Vec<AccessProblem> {
    let problem = |login: &str, kind, user: &str, grant_id: &str, subject: &str, reason: &str| {
        AccessProblem {
            machine_id: machine.id,
            hostname: machine.inventory.hostname.clone(),
            login: login.to_owned(),
            kind,
            user: user.to_owned(),
            grant_id: grant_id.to_owned(),
            subject: subject.to_owned(),
            reason: reason.to_owned(),
        }
    };
    let refused = record
        .refused
        .iter()
        .filter(|refusal| user.is_none_or(|user| refusal.user == user))
        .map(|refusal| {
            problem(
                &refusal.login,
                AccessProblemKind::Refused,
                &refusal.user,
                &refusal.grant_id,
                &refusal.key,
                &refusal.reason,
            )
        });
    let not_read = record
        .found
        .iter()
        .filter(|_| user.is_none())
        .filter_map(|file| {
            let reason = file.not_read_reason.as_deref()?;
            Some(problem(
                &file.login,
                AccessProblemKind::NotRead,
                "",
                "",
                &file.source,
                reason,
            ))
        });
    refused.chain(not_read).collect()
}

/// At most [`MAX_REPORTED_TEXT_CHARS`] characters of an agent's text.
fn cut(mut text: String) -> String {
    if let Some((index, _)) = text.char_indices().nth(MAX_REPORTED_TEXT_CHARS) {
        text.truncate(index);
        text.push('…');
    }
    text
}

/// An agent's report cut to the bounds, sorted so that equal findings
/// compare equal.
fn bounded(machine_id: Uuid, reported: ReportedAccess, now: i64) -> MachineAccessRecord {
    let mut missing_logins = reported.missing_logins;
    missing_logins.truncate(MAX_REPORTED_LOGINS);
    missing_logins.sort();
    let mut found: Vec<FoundKeysRecord> = reported
        .found
        .into_iter()
        .take(MAX_REPORTED_LOGINS)
        .map(|mut file| {
            file.public_keys.truncate(MAX_REPORTED_KEYS_PER_FILE);
            file.not_read_reason = file.not_read_reason.map(cut);
            file
        })
        .collect();
    found.sort_by(|a, b| (&a.login, &a.source).cmp(&(&b.login, &b.source)));
    let refused = reported
        .refused
        .into_iter()
        .take(MAX_REPORTED_REFUSALS)
        .map(|refusal| RefusedKeyRecord {
            login: cut(refusal.login),
            user: cut(refusal.user),
            grant_id: cut(refusal.grant_id),
            key: cut(refusal.key),
            reason: cut(refusal.reason),
        })
        .collect();
    MachineAccessRecord {
        machine_id,
        applied_version: reported.applied_version,
        applied_at: now,
        missing_logins,
        found,
        refused,
    }
}

/// An agent's access acknowledgement and findings, kept in memory (flushed
/// to the store in batches).
pub fn record_access_state(
    state: &ServerState,
    machine_id: Uuid,
    reported: ReportedAccess,
    now: i64,
) {
    state.access.record(bounded(machine_id, reported, now));
}

/// Off-boards `name`: every grant and key removed and pushed first (that is
/// what must reach every machine within a second), then the operator of the
/// same name revoked, if there is one.
pub async fn offboard_user(
    state: &ServerState,
    name: &str,
    revoked_by: &str,
) -> Result<Offboarded, AccessServiceError> {
    let now = state.clock.now_unix();
    let revocation = state
        .access
        .store()
        .revoke_user(name, now)
        .await?
        .ok_or_else(|| AccessServiceError::NoSuchUser(name.to_owned()))?;
    let policy_version = state.publisher.access_changed().await?;
    let operator = match state.store.operator(name).await? {
        None => "none".to_owned(),
        Some(operator) if operator.revoked_at.is_some() => "already revoked".to_owned(),
        Some(_) => match operators::revoke(state, name, revoked_by).await {
            Ok(_) => "revoked".to_owned(),
            Err(error) => format!("not revoked: {error}"),
        },
    };
    tracing::warn!(user = name, %revoked_by, grants = revocation.grants_removed, keys = revocation.keys_removed, %operator, policy_version, "user off-boarded");
    Ok(Offboarded {
        revocation,
        policy_version,
        operator,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const ALICE_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKvkDk0qYpGPzoRl3X27cRHkeu9MS8y63dSFMpU6xIuH alice@laptop";

    fn machine(labels: &[(&str, &str)], retired_at: Option<i64>) -> MachineRecord {
        MachineRecord {
            labels: labels
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            retired_at,
            ..crate::store::contract::machine(Uuid::new_v4(), "web-1")
        }
    }

    #[test]
    fn new_user_keys_report_every_bad_and_repeated_key_together() {
        let texts = [
            ALICE_KEY.to_owned(),
            "not a key".to_owned(),
            ALICE_KEY.to_owned(),
        ];
        let error = new_user_keys("alice", &texts, 7).unwrap_err();
        let AccessServiceError::KeysRefused(problems) = &error else {
            panic!("unexpected error {error}");
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("key 2: "), "{problems:?}");
        assert_eq!(problems[1], "key 3: the same key is given twice");
        assert!(error
            .to_string()
            .starts_with("SSH public keys refused: key 2: "));

        let keys = new_user_keys("alice", &texts[..1], 7).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].user, "alice");
        assert_eq!(keys[0].comment, "alice@laptop");
        assert_eq!(keys[0].added_at, 7);
        assert!(keys[0].fingerprint.starts_with("SHA256:"));
    }

    #[test]
    fn a_key_to_remove_is_named_by_fingerprint_or_by_the_key() {
        let by_key = fingerprint_meant(ALICE_KEY).unwrap();
        assert_eq!(fingerprint_meant(&format!("  {by_key} ")).unwrap(), by_key);
        let error = fingerprint_meant("garbage").unwrap_err();
        assert!(
            error.to_string().starts_with("SSH public key refused: "),
            "{error}"
        );
    }

    #[test]
    fn a_grant_request_reports_login_selector_and_expiry_together() {
        let request = NewGrant {
            user: "alice".into(),
            selector: "role in (".into(),
            login: "Root/".into(),
            expires: "yesterday-ish".into(),
        };
        let AccessServiceError::Invalid(problems) = validated_grant(&request, 0).unwrap_err()
        else {
            panic!("expected invalid input");
        };
        assert!(
            matches!(problems[0], AccessError::InvalidLogin(_)),
            "{problems:?}"
        );
        assert!(
            matches!(problems[1], AccessError::InvalidSelector { .. }),
            "{problems:?}"
        );
        assert!(
            matches!(problems[2], AccessError::InvalidExpiry { .. }),
            "{problems:?}"
        );

        let valid = NewGrant {
            selector: "role=web".into(),
            login: "deploy".into(),
            expires: "2030-01-01T00:00:00Z".into(),
            ..request
        };
        assert_eq!(validated_grant(&valid, 0).unwrap(), Some(1_893_456_000));
    }

    #[test]
    fn a_grant_counts_only_matching_machines_in_service() {
        let machines = [
            machine(&[("role", "web")], None),
            machine(&[("role", "web")], Some(5)),
            machine(&[("role", "db")], None),
        ];
        assert_eq!(machines_matching("role=web", &machines), 1);
        assert_eq!(machines_matching("role in (", &machines), 0);
    }

    #[test]
    fn an_agents_access_report_is_bounded_and_sorted() {
        let machine_id = Uuid::new_v4();
        let reported = ReportedAccess {
            applied_version: 3,
            missing_logins: (0..MAX_REPORTED_LOGINS + 5)
                .rev()
                .map(|index| format!("login{index:05}"))
                .collect(),
            found: (0..MAX_REPORTED_LOGINS + 5)
                .rev()
                .map(|index| FoundKeysRecord {
                    login: format!("login{index:05}"),
                    source: "authorized_keys".into(),
                    public_keys: vec![
                        "ssh-ed25519 AAAA".to_owned();
                        MAX_REPORTED_KEYS_PER_FILE + 1
                    ],
                    not_read_reason: Some("x".repeat(MAX_REPORTED_TEXT_CHARS * 4)),
                })
                .collect(),
            refused: (0..MAX_REPORTED_REFUSALS + 5)
                .map(|_| RefusedKeyRecord {
                    login: "root".into(),
                    user: "eve".into(),
                    grant_id: "g".into(),
                    key: "k".repeat(MAX_REPORTED_TEXT_CHARS + 1),
                    reason: "root is never managed".into(),
                })
                .collect(),
        };
        let record = bounded(machine_id, reported, 42);
        assert_eq!(record.machine_id, machine_id);
        assert_eq!(record.applied_version, 3);
        assert_eq!(record.applied_at, 42);
        assert_eq!(record.missing_logins.len(), MAX_REPORTED_LOGINS);
        assert!(record.missing_logins.is_sorted());
        assert_eq!(record.found.len(), MAX_REPORTED_LOGINS);
        assert!(record.found.is_sorted_by(|a, b| a.login <= b.login));
        assert!(record
            .found
            .iter()
            .all(|file| file.public_keys.len() == MAX_REPORTED_KEYS_PER_FILE
                && file.not_read_reason.as_ref().unwrap().chars().count()
                    == MAX_REPORTED_TEXT_CHARS + 1));
        assert_eq!(record.refused.len(), MAX_REPORTED_REFUSALS);
        assert!(
            record
                .refused
                .iter()
                .all(|refusal| refusal.key.ends_with('…')
                    && refusal.reason == "root is never managed")
        );
    }

    #[test]
    fn a_store_clash_is_named_as_already_existing() {
        let error = AccessServiceError::from(StoreError::AlreadyExists("user alice".into()));
        assert!(matches!(error, AccessServiceError::AlreadyExists(_)));
        assert_eq!(error.to_string(), "user alice already exists");
    }

    #[test]
    fn the_key_type_is_the_first_word_of_the_key() {
        assert_eq!(key_type_of("ssh-ed25519 AAAA comment"), "ssh-ed25519");
        assert_eq!(key_type_of(""), "");
    }
}
