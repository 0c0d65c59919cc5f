//! The agent's own access boundary: what it installs whatever the server
//! says. A compromised server (or a stolen CA key) must not mean root SSH
//! on every machine, so each policy is screened here before it is
//! persisted or enforced:
//!
//! * **Logins.** `[access] allowed_logins` lists the logins this machine
//!   lets Flotte manage. Absent, the default is every login except `root`
//!   (any account of uid 0) and *system accounts*: a uid outside
//!   `UID_MIN..=UID_MAX` of `/etc/login.defs` (1000..=60000 when the file
//!   does not say), or a shell that refuses logins (`nologin`, `false`). A
//!   login unknown on this machine is not refused here (it is reported
//!   missing, and sshd cannot log it in). A login that is not a plain Unix
//!   name is refused whatever the list says.
//! * **Keys.** Every key line is re-validated: exactly `type base64` (no
//!   options such as `command="…"` or `from="…"`, no comment), no control
//!   character (a newline would smuggle a second line into the file), a
//!   known type whose base64 blob decodes and matches it; the user and
//!   grant id written in the key's comment are plain words.
//!
//! Everything refused is kept as a [`Refusal`] and reported to the server.
//! The decisions are pure: what the user database says of each login is
//! looked up beforehand (by the enforcer, on the blocking pool with a time
//! bound) and handed in as [`LookedUp`]; a login the database did not
//! answer for in time is refused (fail closed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use flotte_proto::names::quoted_prefix;
use flotte_proto::ssh_keys::{parse_public_key, ACCEPTED_KEY_TYPES};
use serde::{Deserialize, Serialize};

use super::files::{is_safe_login, LoginAccount};
use super::policy::{LocalKey, LocalPolicy};

/// Where `UID_MIN`/`UID_MAX` are read from.
pub const LOGIN_DEFS: &str = "/etc/login.defs";
/// `useradd`'s own defaults when `/etc/login.defs` does not say.
const DEFAULT_UID_MIN: u32 = 1000;
const DEFAULT_UID_MAX: u32 = 60000;
/// Longest user name or grant id written into a key's comment.
const MAX_COMMENT_WORD: usize = 128;
/// Refusals kept per policy: a hostile server cannot grow the report.
pub const MAX_REFUSALS: usize = 256;

/// Which logins this machine lets Flotte manage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedLogins {
    /// Every login but root and system accounts (the default).
    PeopleOnly,
    /// Exactly these logins (`[access] allowed_logins`), root included
    /// only if listed.
    Listed(BTreeSet<String>),
}

/// The range of uids of people's accounts on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub min: u32,
    pub max: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange {
            min: DEFAULT_UID_MIN,
            max: DEFAULT_UID_MAX,
        }
    }
}

impl UidRange {
    /// `UID_MIN` and `UID_MAX` of a `login.defs` text; the defaults for
    /// what it does not say (or says unreadably).
    pub fn from_login_defs(text: &str) -> Self {
        let mut range = UidRange::default();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(name), Some(value)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Ok(value) = value.parse::<u32>() else {
                continue;
            };
            match name {
                "UID_MIN" => range.min = value,
                "UID_MAX" => range.max = value,
                _ => {}
            }
        }
        range
    }

    /// This machine's range (`/etc/login.defs`, or the defaults).
    pub fn of_this_machine(login_defs: &Path) -> Self {
        std::fs::read_to_string(login_defs)
            .map(|text| Self::from_login_defs(&text))
            .unwrap_or_default()
    }
}

/// The boundary: the allowed logins and what a system account is here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundary {
    pub allowed: AllowedLogins,
    pub people_uids: UidRange,
}

impl Boundary {
    /// Whether deciding needs the user database (uid and shell): only for
    /// the default; a listed login is decided by its name.
    pub fn needs_lookups(&self) -> bool {
        matches!(self.allowed, AllowedLogins::PeopleOnly)
    }
}

/// What the user database said of one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookedUp {
    Account(LoginAccount),
    /// No such login here (reported missing; sshd cannot log it in).
    Unknown,
    /// Not asked (the boundary decides by name).
    NotAsked,
    /// No answer in time, or the lookup failed: why.
    NoAnswer(String),
}

/// A key (or a whole login) of a policy the agent did not install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub login: String,
    pub user: String,
    pub grant_id: String,
    /// The key's fingerprint, or a short quoted prefix of its text.
    pub key: String,
    pub reason: String,
}

/// Why `login` is outside the boundary, if it is.
pub fn login_refusal(
    login: &str,
    account: Option<&LoginAccount>,
    boundary: &Boundary,
) -> Option<String> {
    if !is_safe_login(login) {
        return Some("the login is not a plain Unix name".to_owned());
    }
    match &boundary.allowed {
        AllowedLogins::Listed(listed) if listed.contains(login) => None,
        AllowedLogins::Listed(_) => {
            Some("the login is not in this machine's [access] allowed_logins".to_owned())
        }
        AllowedLogins::PeopleOnly => {
            if login == "root" || account.is_some_and(|account| account.uid == 0) {
                return Some(
                    "root is never managed unless listed in this machine's [access] allowed_logins"
                        .to_owned(),
                );
            }
            let account = account?;
            let range = boundary.people_uids;
            if !(range.min..=range.max).contains(&account.uid) {
                return Some(format!(
                    "the login is a system account (uid {} outside UID_MIN..=UID_MAX {}..={}); list it in [access] allowed_logins to manage it",
                    account.uid, range.min, range.max
                ));
            }
            let shell = account.shell.file_name().and_then(|name| name.to_str());
            if matches!(shell, Some("nologin" | "false")) {
                return Some(format!(
                    "the login is a system account (its shell {} refuses logins)",
                    account.shell.display()
                ));
            }
            None
        }
    }
}

/// A word written into a key's comment (`flotte:user=…,grant=…`).
fn is_plain_word(word: &str) -> bool {
    !word.is_empty()
        && word.len() <= MAX_COMMENT_WORD
        && word.chars().all(|character| {
            character.is_ascii_alphanumeric() || matches!(character, '_' | '-' | '.' | '@')
        })
}

/// Why `key` cannot be written into an `authorized_keys` file, if it
/// cannot; otherwise its fingerprint.
pub fn key_verdict(key: &LocalKey) -> Result<String, String> {
    let text = &key.public_key;
    if text.chars().any(char::is_control) {
        return Err(
            "the key holds a control character (a newline would add a line to the file)".to_owned(),
        );
    }
    let fields: Vec<&str> = text.split(' ').collect();
    let is_bare = fields.len() == 2 && ACCEPTED_KEY_TYPES.contains(&fields[0]);
    if !is_bare {
        return Err(
            "the key is not exactly `type base64`: options (command=\"…\", from=\"…\"…) and comments are refused"
                .to_owned(),
        );
    }
    let parsed = parse_public_key(text).map_err(|error| format!("the key is invalid: {error}"))?;
    if !is_plain_word(&key.user) {
        return Err(format!(
            "the user name {} is not a plain word",
            quoted_prefix(&key.user)
        ));
    }
    if !is_plain_word(&key.grant_id) {
        return Err(format!(
            "the grant id {} is not a plain word",
            quoted_prefix(&key.grant_id)
        ));
    }
    Ok(parsed.fingerprint())
}

fn key_label(key: &LocalKey) -> String {
    flotte_proto::ssh_keys::fingerprint_of_key_text(&key.public_key)
        .unwrap_or_else(|| quoted_prefix(&key.public_key))
}

/// The part of `policy` inside the boundary, and what was left out, given
/// what the user database said of each login (`looked_up`, which never
/// blocks: the lookups were made before). A login the database did not
/// answer for keeps only its keys in `installed` (the policy narrowed to
/// what is installed, screened when it was installed) and gets no new one:
/// a slow database neither adds access nor locks people out.
pub fn screen(
    policy: &LocalPolicy,
    boundary: &Boundary,
    looked_up: &dyn Fn(&str) -> LookedUp,
    installed: &LocalPolicy,
) -> (LocalPolicy, Vec<Refusal>) {
    let mut refusals = Vec::new();
    let mut refuse = |login: &str, key: &LocalKey, key_text: String, reason: String| {
        if refusals.len() < MAX_REFUSALS {
            refusals.push(Refusal {
                login: login.to_owned(),
                user: key.user.clone(),
                grant_id: key.grant_id.clone(),
                key: key_text,
                reason,
            });
        }
    };
    let mut logins = BTreeMap::new();
    for (login, keys) in &policy.logins {
        let verdict = match looked_up(login) {
            LookedUp::NoAnswer(reason) if boundary.needs_lookups() && is_safe_login(login) => {
                let kept = installed.logins.get(login).cloned().unwrap_or_default();
                for key in keys
                    .iter()
                    .filter(|key| !kept.iter().any(|k| k.same_grant(key)))
                {
                    refuse(login, key, key_label(key), reason.clone());
                }
                if !kept.is_empty() {
                    logins.insert(login.clone(), kept);
                }
                continue;
            }
            LookedUp::Account(account) => login_refusal(login, Some(&account), boundary),
            _ => login_refusal(login, None, boundary),
        };
        if let Some(reason) = verdict {
            for key in keys {
                refuse(login, key, key_label(key), reason.clone());
            }
            continue;
        }
        let mut accepted = Vec::new();
        for key in keys {
            match key_verdict(key) {
                Ok(_) => accepted.push(key.clone()),
                Err(reason) => refuse(login, key, key_label(key), reason),
            }
        }
        if !accepted.is_empty() {
            logins.insert(login.clone(), accepted);
        }
    }
    (
        LocalPolicy {
            version: policy.version,
            logins,
        },
        refusals,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::PathBuf;

    use super::*;
    use crate::access::files::LoginDirectory;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKvkDk0qYpGPzoRl3X27cRHkeu9MS8y63dSFMpU6xIuH";
    const FINGERPRINT: &str = "SHA256:pLGLmxHnsj8TXvxZ88dQsgFMHgkgkJ+FwTNJTirJ34A";

    struct Accounts(BTreeMap<&'static str, (u32, &'static str)>);

    impl LoginDirectory for Accounts {
        fn account_of(&self, login: &str) -> Option<LoginAccount> {
            self.0.get(login).map(|(uid, shell)| LoginAccount {
                home: PathBuf::from(format!("/home/{login}")),
                uid: *uid,
                shell: PathBuf::from(shell),
            })
        }
    }

    fn accounts() -> Accounts {
        Accounts(BTreeMap::from([
            ("root", (0, "/bin/bash")),
            ("toor", (0, "/bin/sh")),
            ("daemon", (1, "/usr/sbin/nologin")),
            ("backup", (34, "/bin/sh")),
            ("svc", (1200, "/usr/sbin/nologin")),
            ("nobody", (65534, "/bin/sh")),
            ("alice", (1001, "/bin/bash")),
        ]))
    }

    fn key(public_key: &str) -> LocalKey {
        LocalKey {
            public_key: public_key.to_owned(),
            user: "alice".into(),
            grant_id: "0f3c-grant".into(),
            expires_at: None,
        }
    }

    fn people_only() -> Boundary {
        Boundary {
            allowed: AllowedLogins::PeopleOnly,
            people_uids: UidRange::default(),
        }
    }

    #[test]
    fn by_default_root_and_system_accounts_are_refused_and_people_are_not() {
        let accounts = accounts();
        let cases = [
            ("root", Some("root is never managed")),
            ("toor", Some("root is never managed")),
            (
                "daemon",
                Some("uid 1 outside UID_MIN..=UID_MAX 1000..=60000"),
            ),
            ("backup", Some("uid 34 outside")),
            ("nobody", Some("uid 65534 outside")),
            ("svc", Some("its shell /usr/sbin/nologin refuses logins")),
            ("alice", None),
            ("not-on-this-machine", None),
            ("../etc", Some("not a plain Unix name")),
        ];
        for (login, expected) in cases {
            let refusal = login_refusal(login, accounts.account_of(login).as_ref(), &people_only());
            match expected {
                None => assert_eq!(refusal, None, "{login}"),
                Some(words) => assert!(
                    refusal
                        .as_deref()
                        .is_some_and(|reason| reason.contains(words)),
                    "{login}: {refusal:?}"
                ),
            }
        }
    }

    #[test]
    fn a_list_allows_exactly_its_logins_root_included_if_listed() {
        let accounts = accounts();
        let listed = Boundary {
            allowed: AllowedLogins::Listed(BTreeSet::from([
                "root".to_owned(),
                "backup".to_owned(),
            ])),
            people_uids: UidRange::default(),
        };
        for login in ["root", "backup"] {
            assert_eq!(
                login_refusal(login, accounts.account_of(login).as_ref(), &listed),
                None
            );
        }
        let refusal = login_refusal("alice", accounts.account_of("alice").as_ref(), &listed);
        assert!(refusal
            .unwrap()
            .contains("not in this machine's [access] allowed_logins"));
    }

    #[test]
    fn login_defs_give_the_range_and_the_defaults_fill_the_rest() {
        let range = UidRange::from_login_defs(
            "# comment\nUID_MIN\t\t 500\nUID_MAX bogus\nSYS_UID_MIN 100\n",
        );
        assert_eq!(
            range,
            UidRange {
                min: 500,
                max: 60000
            }
        );
        assert_eq!(UidRange::from_login_defs(""), UidRange::default());
    }

    #[test]
    fn only_bare_valid_keys_with_plain_comment_words_are_written() {
        assert_eq!(key_verdict(&key(KEY)), Ok(FINGERPRINT.to_owned()));
        let refused = [
            (format!("command=\"/bin/sh\" {KEY}"), "options"),
            (format!("no-pty,from=\"*\" {KEY}"), "options"),
            (format!("{KEY} comment"), "comments are refused"),
            (
                format!("{KEY}\nssh-ed25519 AAAAinjected"),
                "control character",
            ),
            (format!("{KEY}\r"), "control character"),
            ("ssh-ed25519 !!!notbase64".to_owned(), "the key is invalid"),
            ("ssh-dss AAAAB3NzaC1kc3M".to_owned(), "options"),
        ];
        for (text, words) in refused {
            let verdict = key_verdict(&key(&text));
            assert!(
                verdict.as_ref().is_err_and(|reason| reason.contains(words)),
                "{text:?}: {verdict:?}"
            );
        }
        let mut odd_user = key(KEY);
        odd_user.user = "eve,grant=forged\nssh-ed25519 X".into();
        assert!(key_verdict(&odd_user).unwrap_err().contains("user name"));
        let mut odd_grant = key(KEY);
        odd_grant.grant_id = "g 1".into();
        assert!(key_verdict(&odd_grant).unwrap_err().contains("grant id"));
    }

    #[test]
    fn a_login_the_user_database_did_not_answer_for_gets_no_new_key_unless_listed() {
        const OTHER_KEY: &str =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINpvAXiztNTetQLK6xRzciVEKbTwfINuABqNK9qXq8E2";
        let policy = LocalPolicy {
            version: 2,
            logins: BTreeMap::from([("alice".to_owned(), vec![key(KEY), key(OTHER_KEY)])]),
        };
        let no_answer = |_: &str| LookedUp::NoAnswer("the user database did not answer".into());
        let (kept, refusals) = screen(&policy, &people_only(), &no_answer, &LocalPolicy::default());
        assert!(kept.logins.is_empty());
        assert_eq!(refusals.len(), 2);
        assert_eq!(refusals[0].reason, "the user database did not answer");
        // What was installed (and screened then) stays; the new key waits.
        let installed = LocalPolicy {
            version: 1,
            logins: BTreeMap::from([("alice".to_owned(), vec![key(KEY)])]),
        };
        let (kept, refusals) = screen(&policy, &people_only(), &no_answer, &installed);
        assert_eq!(kept.logins, installed.logins);
        assert_eq!(kept.version, 2);
        assert_eq!(refusals.len(), 1);
        assert!(refusals[0].key.starts_with("SHA256:"), "{refusals:?}");
        assert_ne!(refusals[0].key, FINGERPRINT);
        let listed = Boundary {
            allowed: AllowedLogins::Listed(BTreeSet::from(["alice".to_owned()])),
            people_uids: UidRange::default(),
        };
        let (kept, refusals) = screen(&policy, &listed, &no_answer, &LocalPolicy::default());
        assert_eq!(kept.logins, policy.logins);
        assert!(refusals.is_empty());
    }

    #[test]
    fn screening_keeps_what_is_inside_and_names_each_refusal() {
        let policy = LocalPolicy {
            version: 7,
            logins: BTreeMap::from([
                ("root".to_owned(), vec![key(KEY)]),
                (
                    "alice".to_owned(),
                    vec![key(KEY), key(&format!("command=\"id\" {KEY}"))],
                ),
                ("daemon".to_owned(), vec![key(KEY)]),
            ]),
        };
        let accounts = accounts();
        let looked_up = |login: &str| match accounts.account_of(login) {
            Some(account) => LookedUp::Account(account),
            None => LookedUp::Unknown,
        };
        let (kept, refusals) = screen(&policy, &people_only(), &looked_up, &LocalPolicy::default());
        assert_eq!(kept.version, 7);
        assert_eq!(
            kept.logins,
            BTreeMap::from([("alice".to_owned(), vec![key(KEY)])])
        );
        let summary: Vec<(&str, bool)> = refusals
            .iter()
            .map(|refusal| (refusal.login.as_str(), refusal.key == FINGERPRINT))
            .collect();
        assert_eq!(
            summary,
            vec![("alice", false), ("daemon", true), ("root", true)]
        );
        assert!(
            refusals[0]
                .key
                .starts_with("\"command=\\\"id\\\" ssh-ed25519"),
            "{:?}",
            refusals[0]
        );
        assert!(refusals[0].reason.contains("options"));
        assert!(refusals
            .iter()
            .all(|refusal| refusal.user == "alice" && !refusal.reason.is_empty()));
    }
}
