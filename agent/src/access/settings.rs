//! The `[access]` table of `agent.toml`. Absent: the agent manages no SSH
//! access at all (and acknowledges no access policy, so the server lists
//! the machine as pending). Present: every key has a default.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use flotte_proto::settings::parse_duration_field;
use serde::Deserialize;

use super::boundary::AllowedLogins;
use super::files::is_safe_login;
use super::policy::OnDisconnect;
use super::AccessSettings;

pub const DEFAULT_AUTHORIZED_KEYS_DIR: &str = "/etc/flotte/authorized_keys";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfigFile {
    /// One file per login (sshd: `AuthorizedKeysFile <dir>/%u`).
    pub authorized_keys_dir: PathBuf,
    /// End the live SSH sessions of a login when it loses a key.
    pub terminate_sessions: bool,
    /// "keep" (default: the last policy stays, expiry still applies) or
    /// "fail-closed" (every key removed after `fail_closed_after` without
    /// contact with the server).
    pub on_disconnect: String,
    pub fail_closed_after: String,
    /// The logins this machine lets Flotte manage, whatever the server
    /// sends. Absent: every login but root and system accounts.
    pub allowed_logins: Option<Vec<String>>,
}

impl Default for AccessConfigFile {
    fn default() -> Self {
        AccessConfigFile {
            authorized_keys_dir: PathBuf::from(DEFAULT_AUTHORIZED_KEYS_DIR),
            terminate_sessions: false,
            on_disconnect: "keep".into(),
            fail_closed_after: "24h".into(),
            allowed_logins: None,
        }
    }
}

impl AccessConfigFile {
    /// The validated settings; problems are appended to `problems`.
    pub fn validate(&self, problems: &mut Vec<String>) -> AccessSettings {
        if !self.authorized_keys_dir.is_absolute() {
            problems.push(format!(
                "access.authorized_keys_dir = {:?} must be an absolute path",
                self.authorized_keys_dir.display().to_string()
            ));
        }
        let fail_closed_after = parse_duration_field(
            "access.fail_closed_after",
            &self.fail_closed_after,
            Duration::from_secs(1),
            problems,
        );
        let on_disconnect = match self.on_disconnect.as_str() {
            "keep" => OnDisconnect::Keep,
            "fail-closed" => OnDisconnect::FailClosedAfter(fail_closed_after),
            other => {
                problems.push(format!(
                    "access.on_disconnect = {other:?} is not \"keep\" or \"fail-closed\""
                ));
                OnDisconnect::Keep
            }
        };
        let allowed_logins = match &self.allowed_logins {
            None => AllowedLogins::PeopleOnly,
            Some(listed) => {
                for login in listed.iter().filter(|login| !is_safe_login(login)) {
                    problems.push(format!(
                        "access.allowed_logins holds {}, which is not a plain Unix login name",
                        flotte_proto::names::quoted_prefix(login)
                    ));
                }
                AllowedLogins::Listed(listed.iter().cloned().collect::<BTreeSet<String>>())
            }
        };
        AccessSettings {
            authorized_keys_dir: self.authorized_keys_dir.clone(),
            terminate_sessions: self.terminate_sessions,
            on_disconnect,
            allowed_logins,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn defaults_and_every_problem_together() {
        let mut problems = Vec::new();
        let settings = AccessConfigFile::default().validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(settings.on_disconnect, OnDisconnect::Keep);
        assert_eq!(settings.allowed_logins, AllowedLogins::PeopleOnly);
        assert_eq!(
            settings.authorized_keys_dir,
            PathBuf::from("/etc/flotte/authorized_keys")
        );

        let file: AccessConfigFile = toml::from_str(
            "authorized_keys_dir = \"relative\"\non_disconnect = \"panic\"\nfail_closed_after = \"soon\"\nallowed_logins = [\"deploy\", \"../etc\"]",
        )
        .unwrap();
        let mut problems = Vec::new();
        file.validate(&mut problems);
        let text = problems.join("\n");
        for expected in [
            "must be an absolute path",
            "\"panic\" is not",
            "fail_closed_after",
            "\"../etc\", which is not a plain Unix login name",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }

        let file: AccessConfigFile = toml::from_str(
            "on_disconnect = \"fail-closed\"\nfail_closed_after = \"2h\"\nallowed_logins = [\"root\"]",
        )
        .unwrap();
        assert_eq!(
            file.validate(&mut Vec::new()).allowed_logins,
            AllowedLogins::Listed(BTreeSet::from(["root".to_owned()]))
        );
        let mut problems = Vec::new();
        assert_eq!(
            file.validate(&mut problems).on_disconnect,
            OnDisconnect::FailClosedAfter(Duration::from_secs(7200))
        );
    }
}
