//! Pure decisions of access: which keys may log in as which login on one
//! machine (`compile_policy`), where a machine stands with a policy version
//! (`delivery_status`), and the who-has-access rows that put what was
//! granted next to what the agent found (`access_report`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use flotte_proto::labels::Selector;

use crate::store::{AccessSnapshot, FoundKeysRecord, GrantRecord, UnixSeconds, UserKeyRecord};

/// The stored access state with selectors parsed once, ready to compile the
/// policy of any number of machines.
#[derive(Debug, Clone, Default)]
pub struct AccessInputs {
    pub version: u64,
    /// Grants whose selector parses (a stored selector was validated when it
    /// was granted; one that no longer parses grants nothing).
    pub grants: Vec<(GrantRecord, Selector)>,
    pub keys_by_user: BTreeMap<String, Vec<UserKeyRecord>>,
    /// `type base64` → owning user, for naming keys found on machines.
    pub owner_by_key: HashMap<String, String>,
}

impl AccessInputs {
    pub fn from_snapshot(snapshot: &AccessSnapshot) -> Self {
        let revoked: BTreeSet<&str> = snapshot
            .users
            .iter()
            .filter(|user| user.revoked_at.is_some())
            .map(|user| user.name.as_str())
            .collect();
        let grants = snapshot
            .grants
            .iter()
            .filter(|grant| !revoked.contains(grant.user.as_str()))
            .filter_map(|grant| {
                Selector::parse(&grant.selector)
                    .ok()
                    .map(|selector| (grant.clone(), selector))
            })
            .collect();
        let mut keys_by_user: BTreeMap<String, Vec<UserKeyRecord>> = BTreeMap::new();
        let mut owner_by_key = HashMap::new();
        for key in &snapshot.keys {
            owner_by_key.insert(key.public_key.clone(), key.user.clone());
            if !revoked.contains(key.user.as_str()) {
                keys_by_user
                    .entry(key.user.clone())
                    .or_default()
                    .push(key.clone());
            }
        }
        AccessInputs {
            version: snapshot.version,
            grants,
            keys_by_user,
            owner_by_key,
        }
    }
}

/// One key allowed to log in as one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedKey {
    /// `type base64`.
    pub public_key: String,
    pub fingerprint: String,
    pub key_type: String,
    pub user: String,
    pub grant_id: String,
    pub expires_at: Option<UnixSeconds>,
}

/// The access policy of one machine: login → keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachinePolicy {
    pub version: u64,
    pub logins: BTreeMap<String, Vec<GrantedKey>>,
}

/// The grants (ids, sorted) whose reach over one machine changes when its
/// labels go from `before` to `after`: those that apply on one side only.
/// A relabel that changes any needs the role that may grant access.
pub fn grants_changed_by_relabel(
    inputs: &AccessInputs,
    zone: &str,
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
    now: UnixSeconds,
) -> Vec<String> {
    let mut changed: Vec<String> = inputs
        .grants
        .iter()
        .filter(|(grant, selector)| {
            grant_applies(grant, selector, before, zone, now)
                != grant_applies(grant, selector, after, zone, now)
        })
        .map(|(grant, _)| grant.id.clone())
        .collect();
    changed.sort();
    changed
}

/// Whether a grant gives access on a machine with these labels at `now`.
pub fn grant_applies(
    grant: &GrantRecord,
    selector: &Selector,
    labels: &BTreeMap<String, String>,
    zone: &str,
    now: UnixSeconds,
) -> bool {
    grant.expires_at.is_none_or(|expires_at| expires_at > now)
        && selector.matches(|key| labels.get(key).map(String::as_str), zone)
}

/// The policy of one machine: every key of every user holding a grant whose
/// selector matches the machine and which has not expired at `now`. A key
/// granted twice for one login (two grants) appears once, with the grant
/// that lasts longest.
pub fn compile_policy(
    inputs: &AccessInputs,
    labels: &BTreeMap<String, String>,
    zone: &str,
    now: UnixSeconds,
) -> MachinePolicy {
    let mut logins: BTreeMap<String, Vec<GrantedKey>> = BTreeMap::new();
    for (grant, selector) in &inputs.grants {
        if !grant_applies(grant, selector, labels, zone, now) {
            continue;
        }
        let Some(keys) = inputs.keys_by_user.get(&grant.user) else {
            continue;
        };
        let granted = logins.entry(grant.login.clone()).or_default();
        for key in keys {
            let candidate = GrantedKey {
                public_key: key.public_key.clone(),
                fingerprint: key.fingerprint.clone(),
                key_type: key.key_type.clone(),
                user: key.user.clone(),
                grant_id: grant.id.clone(),
                expires_at: grant.expires_at,
            };
            match granted
                .iter_mut()
                .find(|existing| existing.public_key == candidate.public_key)
            {
                Some(existing) if lasts_longer(candidate.expires_at, existing.expires_at) => {
                    *existing = candidate;
                }
                Some(_) => {}
                None => granted.push(candidate),
            }
        }
    }
    MachinePolicy {
        version: inputs.version,
        logins,
    }
}

fn lasts_longer(candidate: Option<UnixSeconds>, existing: Option<UnixSeconds>) -> bool {
    match (candidate, existing) {
        (None, Some(_)) => true,
        (Some(candidate), Some(existing)) => candidate > existing,
        _ => false,
    }
}

/// Where a machine stands with a policy version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// It acknowledged this version or a later one.
    Applied,
    /// Connected, the version is on its way.
    Pending,
    /// Not connected: it gets the policy when it reconnects.
    Unreachable,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Applied => "applied",
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Unreachable => "unreachable",
        }
    }
}

pub fn delivery_status(
    applied_version: u64,
    target_version: u64,
    connected: bool,
) -> DeliveryStatus {
    if applied_version >= target_version {
        DeliveryStatus::Applied
    } else if connected {
        DeliveryStatus::Pending
    } else {
        DeliveryStatus::Unreachable
    }
}

/// One line of the who-has-access report for one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    pub login: String,
    /// Owner of the key if Flotte knows it (possibly a revoked user's key).
    pub user: Option<String>,
    pub public_key: String,
    pub granted: bool,
    pub found: bool,
    pub sources: Vec<String>,
    pub grant_id: Option<String>,
    pub expires_at: Option<UnixSeconds>,
    /// Found on the machine but not granted for this login.
    pub drift: bool,
}

/// Puts what `policy` grants next to what the agent `found`, per login and
/// key: granted keys (found or not yet) and found keys nobody granted
/// (drift: a hand-added line, a key left behind).
pub fn access_report(
    policy: &MachinePolicy,
    found: &[FoundKeysRecord],
    owner_by_key: &HashMap<String, String>,
) -> Vec<ReportRow> {
    let mut rows: BTreeMap<(String, String), ReportRow> = BTreeMap::new();
    for (login, keys) in &policy.logins {
        for key in keys {
            rows.insert(
                (login.clone(), key.public_key.clone()),
                ReportRow {
                    login: login.clone(),
                    user: Some(key.user.clone()),
                    public_key: key.public_key.clone(),
                    granted: true,
                    found: false,
                    sources: Vec::new(),
                    grant_id: Some(key.grant_id.clone()),
                    expires_at: key.expires_at,
                    drift: false,
                },
            );
        }
    }
    for file in found {
        for public_key in &file.public_keys {
            let row = rows
                .entry((file.login.clone(), public_key.clone()))
                .or_insert_with(|| ReportRow {
                    login: file.login.clone(),
                    user: owner_by_key.get(public_key).cloned(),
                    public_key: public_key.clone(),
                    granted: false,
                    found: false,
                    sources: Vec::new(),
                    grant_id: None,
                    expires_at: None,
                    drift: true,
                });
            row.found = true;
            if !row.sources.contains(&file.source) {
                row.sources.push(file.source.clone());
            }
        }
    }
    rows.into_values().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]
    use super::*;
    use crate::store::UserRecord;

    fn user(name: &str, revoked: bool) -> UserRecord {
        UserRecord {
            name: name.into(),
            created_at: 0,
            created_by: "admin".into(),
            revoked_at: revoked.then_some(5),
        }
    }

    fn key(user: &str, text: &str) -> UserKeyRecord {
        UserKeyRecord {
            user: user.into(),
            fingerprint: format!("SHA256:{text}"),
            key_type: "ssh-ed25519".into(),
            public_key: format!("ssh-ed25519 {text}"),
            comment: String::new(),
            added_at: 0,
        }
    }

    fn grant(
        id: &str,
        user: &str,
        selector: &str,
        login: &str,
        expires: Option<i64>,
    ) -> GrantRecord {
        GrantRecord {
            id: id.into(),
            user: user.into(),
            selector: selector.into(),
            login: login.into(),
            expires_at: expires,
            created_at: 0,
            created_by: "admin".into(),
        }
    }

    fn labels(text: &str) -> BTreeMap<String, String> {
        flotte_proto::labels::parse_labels(text).unwrap()
    }

    fn inputs() -> AccessInputs {
        AccessInputs::from_snapshot(&AccessSnapshot {
            version: 7,
            users: vec![
                user("alice", false),
                user("bob", false),
                user("mallory", true),
            ],
            keys: vec![
                key("alice", "A1"),
                key("alice", "A2"),
                key("bob", "B1"),
                key("mallory", "M1"),
            ],
            grants: vec![
                grant("g1", "alice", "role=web", "alice", None),
                grant("g2", "bob", "role=db", "bob", Some(100)),
                grant("g3", "bob", "zone=dc1", "deploy", None),
                grant("g4", "mallory", "", "root", None),
                grant("g5", "alice", "role=web,env=prod", "alice", Some(50)),
            ],
        })
    }

    #[test]
    fn a_relabel_names_the_grants_it_moves_the_machine_into_or_out_of() {
        // (zone, labels before, labels after, now, grants changed)
        let cases: [(&str, &str, &str, i64, &[&str]); 7] = [
            ("dc2", "role=db", "role=db,team=a", 0, &[]),
            ("dc2", "role=db", "role=web", 0, &["g1", "g2"]),
            ("dc2", "role=web", "role=web,env=prod", 0, &["g5"]),
            ("dc2", "role=web", "role=web,env=prod", 60, &[]), // g5 expired at 50
            ("dc2", "role=db", "role=db", 200, &[]),           // no change, g2 long expired
            ("dc1", "role=db", "role=web", 200, &["g1"]),      // g3 follows the zone, not labels
            ("dc2", "", "role=web,env=prod", 0, &["g1", "g5"]),
        ];
        let inputs = inputs();
        for (zone, before, after, now, expected) in cases {
            assert_eq!(
                grants_changed_by_relabel(&inputs, zone, &labels(before), &labels(after), now),
                expected.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
                "{zone} {before:?} → {after:?} at {now}"
            );
        }
    }

    fn summary(policy: &MachinePolicy) -> Vec<(String, Vec<(String, String)>)> {
        policy
            .logins
            .iter()
            .map(|(login, keys)| {
                (
                    login.clone(),
                    keys.iter()
                        .map(|key| (key.public_key.clone(), key.grant_id.clone()))
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn policies_follow_selectors_expiry_and_revocation() {
        let inputs = inputs();
        let pair = |key: &str, grant: &str| (format!("ssh-ed25519 {key}"), grant.to_owned());
        // (labels, zone, now, expected login → keys)
        let cases: Vec<(&str, &str, i64, Vec<(&str, Vec<(String, String)>)>)> = vec![
            (
                "role=web",
                "dc2",
                10,
                vec![("alice", vec![pair("A1", "g1"), pair("A2", "g1")])],
            ),
            (
                "role=web,env=prod",
                "dc2",
                10,
                // g1 (never expires) wins over g5 (expires at 50).
                vec![("alice", vec![pair("A1", "g1"), pair("A2", "g1")])],
            ),
            ("role=db", "dc2", 10, vec![("bob", vec![pair("B1", "g2")])]),
            // g2 expired at 100.
            ("role=db", "dc2", 100, vec![]),
            (
                "role=db",
                "dc1",
                10,
                vec![
                    ("bob", vec![pair("B1", "g2")]),
                    ("deploy", vec![pair("B1", "g3")]),
                ],
            ),
            // mallory is revoked: her match-everything grant gives nothing.
            ("role=cache", "dc9", 10, vec![]),
        ];
        for (machine_labels, zone, now, expected) in cases {
            let policy = compile_policy(&inputs, &labels(machine_labels), zone, now);
            assert_eq!(policy.version, 7);
            let expected: Vec<(String, Vec<(String, String)>)> = expected
                .into_iter()
                .map(|(login, keys)| (login.to_owned(), keys))
                .collect();
            assert_eq!(summary(&policy), expected, "{machine_labels} {zone} {now}");
        }
    }

    #[test]
    fn delivery_status_table() {
        let cases = [
            (5, 5, true, DeliveryStatus::Applied),
            (6, 5, false, DeliveryStatus::Applied),
            (4, 5, true, DeliveryStatus::Pending),
            (4, 5, false, DeliveryStatus::Unreachable),
            (0, 1, false, DeliveryStatus::Unreachable),
        ];
        for (applied, target, connected, expected) in cases {
            assert_eq!(delivery_status(applied, target, connected), expected);
        }
    }

    #[test]
    fn the_report_flags_keys_nobody_granted() {
        let inputs = inputs();
        let policy = compile_policy(&inputs, &labels("role=web"), "dc2", 10);
        let found = vec![
            FoundKeysRecord {
                login: "alice".into(),
                source: "/etc/flotte/authorized_keys/alice".into(),
                public_keys: vec!["ssh-ed25519 A1".into(), "ssh-ed25519 A2".into()],
                not_read_reason: None,
            },
            FoundKeysRecord {
                login: "alice".into(),
                source: "/home/alice/.ssh/authorized_keys".into(),
                public_keys: vec!["ssh-ed25519 A1".into(), "ssh-ed25519 STRANGER".into()],
                not_read_reason: None,
            },
            FoundKeysRecord {
                login: "alice".into(),
                source: "/home/alice/.ssh/authorized_keys".into(),
                public_keys: vec!["ssh-ed25519 M1".into()],
                not_read_reason: None,
            },
        ];
        let rows = access_report(&policy, &found, &inputs.owner_by_key);
        let view: Vec<(&str, bool, bool, bool, Option<&str>, usize)> = rows
            .iter()
            .map(|row| {
                (
                    row.public_key.as_str(),
                    row.granted,
                    row.found,
                    row.drift,
                    row.user.as_deref(),
                    row.sources.len(),
                )
            })
            .collect();
        assert_eq!(
            view,
            vec![
                ("ssh-ed25519 A1", true, true, false, Some("alice"), 2),
                ("ssh-ed25519 A2", true, true, false, Some("alice"), 1),
                ("ssh-ed25519 M1", false, true, true, Some("mallory"), 1),
                ("ssh-ed25519 STRANGER", false, true, true, None, 1),
            ]
        );
    }
}
