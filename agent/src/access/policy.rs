//! Pure decisions of the agent's access enforcement: whether an incoming
//! policy replaces the applied one, which keys are in force at a given time
//! (expiry, and failing closed after a long disconnection), when the next
//! change happens by itself, and the text of one managed file.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One key allowed to log in as a login, as received from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalKey {
    /// `type base64`.
    pub public_key: String,
    pub user: String,
    pub grant_id: String,
    /// Seconds since the Unix epoch; `None` = never.
    pub expires_at: Option<i64>,
}

impl LocalKey {
    /// The same key for the same user and grant (expiry aside).
    pub fn same_grant(&self, other: &LocalKey) -> bool {
        self.public_key == other.public_key
            && self.user == other.user
            && self.grant_id == other.grant_id
    }
}

/// The access policy as the agent applied (and persisted) it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalPolicy {
    pub version: u64,
    pub logins: BTreeMap<String, Vec<LocalKey>>,
}

/// What the agent does with grants while it cannot reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisconnect {
    /// Keep enforcing the last policy (expiry still applies). The default:
    /// a server outage must not lock people out of the machines they need
    /// to repair it.
    Keep,
    /// Remove every key once the server has been unreachable this long.
    FailClosedAfter(Duration),
}

/// Whether `incoming` replaces `applied`. Versions are global and only
/// grow; an equal version with different content is the same policy
/// compiled for new labels of this machine, so it is applied too.
pub fn should_apply(applied: &LocalPolicy, incoming: &LocalPolicy) -> bool {
    incoming.version > applied.version
        || (incoming.version == applied.version && incoming.logins != applied.logins)
}

/// `incoming` narrowed to what `installed` already holds: for each login,
/// the installed keys that `incoming` still grants (same key, user and
/// grant), each expiring at the earlier of its two times. It only removes
/// or shortens access, so it is applied the moment a policy arrives, before
/// anything is looked up: a revocation never waits for the user database.
/// It keeps `installed`'s version (the incoming one is acknowledged once it
/// has been screened whole).
pub fn narrowed_to_installed(incoming: &LocalPolicy, installed: &LocalPolicy) -> LocalPolicy {
    let earlier = |first: Option<i64>, second: Option<i64>| match (first, second) {
        (Some(first), Some(second)) => Some(first.min(second)),
        (first, second) => first.or(second),
    };
    let logins = installed
        .logins
        .iter()
        .filter_map(|(login, installed_keys)| {
            let granted = incoming.logins.get(login)?;
            let kept: Vec<LocalKey> = installed_keys
                .iter()
                .filter_map(|key| {
                    let still = granted.iter().find(|granted| granted.same_grant(key))?;
                    Some(LocalKey {
                        expires_at: earlier(key.expires_at, still.expires_at),
                        ..key.clone()
                    })
                })
                .collect();
            (!kept.is_empty()).then(|| (login.clone(), kept))
        })
        .collect();
    LocalPolicy {
        version: installed.version,
        logins,
    }
}

/// When the agent stopped hearing from the server; `None` while connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contact {
    pub disconnected_since: Option<i64>,
}

fn fail_closed_deadline(on_disconnect: OnDisconnect, contact: Contact) -> Option<i64> {
    match (on_disconnect, contact.disconnected_since) {
        (OnDisconnect::FailClosedAfter(after), Some(since)) => {
            Some(since.saturating_add(i64::try_from(after.as_secs()).unwrap_or(i64::MAX)))
        }
        _ => None,
    }
}

/// The keys in force at `now`, per login (logins left with no key are
/// absent, so their files are removed).
pub fn keys_in_force(
    policy: &LocalPolicy,
    now: i64,
    on_disconnect: OnDisconnect,
    contact: Contact,
) -> BTreeMap<String, Vec<LocalKey>> {
    if fail_closed_deadline(on_disconnect, contact).is_some_and(|deadline| now >= deadline) {
        return BTreeMap::new();
    }
    policy
        .logins
        .iter()
        .filter_map(|(login, keys)| {
            let live: Vec<LocalKey> = keys
                .iter()
                .filter(|key| key.expires_at.is_none_or(|expires_at| expires_at > now))
                .cloned()
                .collect();
            (!live.is_empty()).then(|| (login.clone(), live))
        })
        .collect()
}

/// The next time at which [`keys_in_force`] changes by itself (an expiry or
/// the fail-closed deadline), if any is after `now`.
pub fn next_change_after(
    policy: &LocalPolicy,
    now: i64,
    on_disconnect: OnDisconnect,
    contact: Contact,
) -> Option<i64> {
    policy
        .logins
        .values()
        .flatten()
        .filter_map(|key| key.expires_at)
        .chain(fail_closed_deadline(on_disconnect, contact))
        .filter(|at| *at > now)
        .min()
}

/// sshd's `expiry-time` value for a Unix time: `YYYYMMDDHHMMSSZ` (UTC).
pub fn sshd_expiry_time(unix: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .chars()
        .filter(|character| !matches!(character, '-' | ':' | 'T'))
        .collect()
}

/// The text of a managed `authorized_keys` file: one key per line, the
/// comment naming the user and grant (so a human reading it knows why). A
/// key with an expiry also carries sshd's own `expiry-time` option: sshd
/// refuses it after that time even if the agent were not running to remove it.
pub fn authorized_keys_text(keys: &[LocalKey]) -> String {
    let mut text = String::from("# Managed by flotte-agent: edits are overwritten.\n");
    for key in keys {
        if let Some(expires_at) = key.expires_at {
            text.push_str(&format!(
                "expiry-time=\"{}\" ",
                sshd_expiry_time(expires_at)
            ));
        }
        text.push_str(&format!(
            "{} flotte:user={},grant={}\n",
            key.public_key, key.user, key.grant_id
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn key(text: &str, expires_at: Option<i64>) -> LocalKey {
        LocalKey {
            public_key: format!("ssh-ed25519 {text}"),
            user: "alice".into(),
            grant_id: "g-1".into(),
            expires_at,
        }
    }

    fn policy(version: u64) -> LocalPolicy {
        LocalPolicy {
            version,
            logins: BTreeMap::from([
                (
                    "alice".to_owned(),
                    vec![key("A", None), key("B", Some(100))],
                ),
                ("deploy".to_owned(), vec![key("C", Some(50))]),
            ]),
        }
    }

    fn logins(keys: &BTreeMap<String, Vec<LocalKey>>) -> Vec<(String, usize)> {
        keys.iter()
            .map(|(login, keys)| (login.clone(), keys.len()))
            .collect()
    }

    #[test]
    fn expiry_and_fail_closed_decide_the_keys_in_force() {
        let connected = Contact {
            disconnected_since: None,
        };
        let away_since_10 = Contact {
            disconnected_since: Some(10),
        };
        let fail_closed = OnDisconnect::FailClosedAfter(Duration::from_secs(60));
        let cases = [
            (
                0,
                OnDisconnect::Keep,
                connected,
                vec![("alice", 2), ("deploy", 1)],
            ),
            (50, OnDisconnect::Keep, connected, vec![("alice", 2)]),
            (100, OnDisconnect::Keep, away_since_10, vec![("alice", 1)]),
            (69, fail_closed, away_since_10, vec![("alice", 2)]),
            (70, fail_closed, away_since_10, vec![]),
            (1_000, fail_closed, connected, vec![("alice", 1)]),
        ];
        for (now, on_disconnect, contact, expected) in cases {
            let expected: Vec<(String, usize)> = expected
                .into_iter()
                .map(|(login, count)| (login.to_owned(), count))
                .collect();
            assert_eq!(
                logins(&keys_in_force(&policy(1), now, on_disconnect, contact)),
                expected,
                "now {now} {on_disconnect:?} {contact:?}"
            );
        }
    }

    #[test]
    fn the_next_change_is_the_nearest_expiry_or_the_fail_closed_deadline() {
        let connected = Contact {
            disconnected_since: None,
        };
        let away = Contact {
            disconnected_since: Some(0),
        };
        let fail_closed = OnDisconnect::FailClosedAfter(Duration::from_secs(30));
        assert_eq!(
            next_change_after(&policy(1), 0, OnDisconnect::Keep, connected),
            Some(50)
        );
        assert_eq!(
            next_change_after(&policy(1), 50, OnDisconnect::Keep, connected),
            Some(100)
        );
        assert_eq!(
            next_change_after(&policy(1), 100, OnDisconnect::Keep, connected),
            None
        );
        assert_eq!(
            next_change_after(&policy(1), 0, fail_closed, away),
            Some(30)
        );
        assert_eq!(
            next_change_after(&policy(1), 0, fail_closed, connected),
            Some(50)
        );
    }

    #[test]
    fn only_newer_or_relabelled_policies_apply() {
        let mut relabelled = policy(3);
        relabelled.logins.remove("deploy");
        assert!(should_apply(&policy(2), &policy(3)));
        assert!(!should_apply(&policy(3), &policy(2)));
        assert!(!should_apply(&policy(3), &policy(3)));
        assert!(should_apply(&policy(3), &relabelled));
        assert!(should_apply(&LocalPolicy::default(), &policy(1)));
    }

    #[test]
    fn narrowing_only_removes_or_shortens_what_is_installed() {
        let installed = policy(2);
        let mut incoming = LocalPolicy {
            version: 3,
            logins: BTreeMap::from([
                (
                    "alice".to_owned(),
                    // A kept but now expiring, B extended, D new.
                    vec![key("A", Some(70)), key("B", None), key("D", None)],
                ),
                ("carol".to_owned(), vec![key("E", None)]),
            ]),
        };
        let narrowed = narrowed_to_installed(&incoming, &installed);
        assert_eq!(
            narrowed,
            LocalPolicy {
                version: 2,
                logins: BTreeMap::from([(
                    "alice".to_owned(),
                    vec![key("A", Some(70)), key("B", Some(100))]
                )]),
            }
        );
        // The same key for another grant is another key.
        incoming.logins.insert(
            "deploy".to_owned(),
            vec![LocalKey {
                grant_id: "g-2".into(),
                ..key("C", Some(50))
            }],
        );
        assert!(!narrowed_to_installed(&incoming, &installed)
            .logins
            .contains_key("deploy"));
        assert_eq!(narrowed_to_installed(&installed, &installed), installed);
    }

    #[test]
    fn managed_files_name_the_user_and_grant_of_each_key_and_sshd_expiry() {
        let text = authorized_keys_text(&[key("A", None), key("B", Some(1_801_353_600))]);
        assert_eq!(
            text,
            "# Managed by flotte-agent: edits are overwritten.\n\
             ssh-ed25519 A flotte:user=alice,grant=g-1\n\
             expiry-time=\"20270131000000Z\" ssh-ed25519 B flotte:user=alice,grant=g-1\n"
        );
    }
}
