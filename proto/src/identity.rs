//! Identity URIs: every certificate issued by a Flotte CA carries exactly one
//! URI SAN of the form `spiffe://<trust-domain>/<kind>/<name>`.
//!
//! Roles and labels are never encoded here: they live on the server so that
//! changing them needs no certificate re-issue.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";

/// What an identity is: a machine (agent), an operator (human or CI) or a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    Machine,
    Operator,
    Server,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Machine => "machine",
            IdentityKind::Operator => "operator",
            IdentityKind::Server => "server",
        }
    }
}

/// A parsed `spiffe://<trust-domain>/<kind>/<name>` identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub kind: IdentityKind,
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity URI {0:?} does not start with spiffe://")]
    NotSpiffe(String),
    #[error("identity URI {0:?} is not of the form spiffe://<trust-domain>/<kind>/<name>")]
    Malformed(String),
    #[error(
        "identity URI {uri:?} has unknown kind {kind:?} (expected machine, operator or server)"
    )]
    UnknownKind { uri: String, kind: String },
    #[error("machine identity {0:?} does not name a UUID")]
    MachineNotUuid(String),
}

impl Identity {
    pub fn machine(trust_domain: &str, machine_id: uuid::Uuid) -> Self {
        Identity {
            trust_domain: trust_domain.to_owned(),
            kind: IdentityKind::Machine,
            name: machine_id.to_string(),
        }
    }

    pub fn operator(trust_domain: &str, name: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_owned(),
            kind: IdentityKind::Operator,
            name: name.to_owned(),
        }
    }

    pub fn server(trust_domain: &str, name: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_owned(),
            kind: IdentityKind::Server,
            name: name.to_owned(),
        }
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/{}/{}",
            self.trust_domain,
            self.kind.as_str(),
            self.name
        )
    }
}

/// Longest name: users, operators, zones, servers, trust domains.
pub const MAX_SEGMENT_BYTES: usize = 128;

/// The one grammar of names, in the words error messages use.
pub const SEGMENT_GRAMMAR: &str =
    "must be 1 to 128 ASCII letters, digits, '.', '_' or '-', and not '.' or '..'";

/// A name is valid for a trust domain or identity segment when it is a
/// non-empty run of `[A-Za-z0-9._-]`: nothing that could smuggle a `/`.
pub fn is_valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= MAX_SEGMENT_BYTES
        // `.` and `..` pass the character test but are paths, not names: a
        // profile written to `--out` named `..` would land in the parent.
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::NotSpiffe(uri.to_owned()))?;
        let mut parts = rest.split('/');
        let (Some(trust_domain), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::Malformed(uri.to_owned()));
        };
        if !is_valid_segment(trust_domain) || !is_valid_segment(name) {
            return Err(IdentityError::Malformed(uri.to_owned()));
        }
        let kind = match kind {
            "machine" => IdentityKind::Machine,
            "operator" => IdentityKind::Operator,
            "server" => IdentityKind::Server,
            other => {
                return Err(IdentityError::UnknownKind {
                    uri: uri.to_owned(),
                    kind: other.to_owned(),
                })
            }
        };
        if kind == IdentityKind::Machine && uuid::Uuid::parse_str(name).is_err() {
            return Err(IdentityError::MachineNotUuid(uri.to_owned()));
        }
        Ok(Identity {
            trust_domain: trust_domain.to_owned(),
            kind,
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_grammar_never_paths_and_bounded() {
        for name in [
            "alice",
            "a.b",
            "dc-1",
            "_svc",
            &"x".repeat(MAX_SEGMENT_BYTES),
        ] {
            assert!(is_valid_segment(name), "{name}");
        }
        for name in [
            "",
            ".",
            "..",
            "a/b",
            "../etc",
            "a b",
            "é",
            "a\u{1b}[31m",
            &"x".repeat(MAX_SEGMENT_BYTES + 1),
        ] {
            assert!(!is_valid_segment(name), "{name:?}");
        }
    }

    #[test]
    fn machine_identity_round_trips() {
        let id = uuid::Uuid::new_v4();
        let identity = Identity::machine("flotte.test", id);
        let parsed: Identity = identity.uri().parse().unwrap();
        assert_eq!(parsed, identity);
        assert_eq!(parsed.kind, IdentityKind::Machine);
        assert_eq!(parsed.name, id.to_string());
    }

    #[test]
    fn malformed_uris_are_refused_with_the_reason() {
        let cases = [
            ("https://x/machine/y", "does not start with spiffe://"),
            ("spiffe://td/operator", "is not of the form"),
            ("spiffe://td/operator/a/b", "is not of the form"),
            ("spiffe://td/robot/a", "unknown kind"),
            ("spiffe://td/machine/not-a-uuid", "does not name a UUID"),
            ("spiffe:///operator/bob", "is not of the form"),
            ("spiffe://td/operator/b@b", "is not of the form"),
        ];
        for (uri, expected) in cases {
            let error = uri.parse::<Identity>().unwrap_err().to_string();
            assert!(error.contains(expected), "{uri}: {error}");
        }
    }
}
