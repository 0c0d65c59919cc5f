//! Names that cross the wire and must mean the same thing on every side: the
//! hostname an agent reports at enrollment and in every hello.
//!
//! A hostname is stored, shown to operators and used to build paths (the
//! `local` remediation provider names a data dir after it), so it is checked
//! against RFC 1123 before anything keeps it. Errors quote at most a short
//! prefix of the offending value: an attacker-sized hostname must not come
//! back whole in an error message, a log line or an HTTP/2 trailer.

/// Longest hostname accepted (RFC 1123 / RFC 1035 presentation form).
pub const MAX_HOSTNAME_BYTES: usize = 253;
/// Longest label (the part between two dots) of a hostname.
pub const MAX_HOSTNAME_LABEL_BYTES: usize = 63;
/// How many characters of an offending value an error quotes.
pub const QUOTED_PREFIX_CHARS: usize = 32;
/// Longest text [`quoted_prefix`] returns, in characters: each quoted
/// character escapes to at most 10 (`\u{10ffff}`), plus two quotes and the
/// ellipsis. Bounded whatever the value (found by the `labels_selectors`
/// fuzz target: 32 escaped characters are longer than 32).
pub const QUOTED_PREFIX_MAX_OUTPUT_CHARS: usize = QUOTED_PREFIX_CHARS * 10 + 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("hostname is empty")]
    EmptyHostname,
    #[error("hostname {prefix} is {length} bytes long; at most {MAX_HOSTNAME_BYTES} are allowed")]
    HostnameTooLong { prefix: String, length: usize },
    #[error("hostname {prefix} has an empty label (two dots in a row, or a dot at either end)")]
    EmptyLabel { prefix: String },
    #[error("hostname {prefix} has a label of {length} bytes; at most {MAX_HOSTNAME_LABEL_BYTES} are allowed")]
    LabelTooLong { prefix: String, length: usize },
    #[error("hostname {prefix} has a label starting or ending with '-'")]
    HyphenAtLabelEdge { prefix: String },
    #[error("hostname {prefix} contains {character:?}: only ASCII letters, digits, '-' and '.' are allowed")]
    InvalidCharacter { prefix: String, character: char },
}

/// At most [`QUOTED_PREFIX_CHARS`] characters of `value`, quoted and escaped
/// (control characters and escape sequences come out as `\u{1b}` etc.), with
/// an ellipsis when it was cut.
pub fn quoted_prefix(value: &str) -> String {
    let mut characters = value.chars();
    let prefix: String = characters.by_ref().take(QUOTED_PREFIX_CHARS).collect();
    let ellipsis = if characters.next().is_some() {
        "…"
    } else {
        ""
    };
    format!("\"{}{ellipsis}\"", prefix.escape_debug())
}

/// Checks `hostname` against RFC 1123: dot-separated labels of 1 to 63 ASCII
/// letters, digits and hyphens, no hyphen at either end of a label, at most
/// 253 bytes in all.
pub fn validate_hostname(hostname: &str) -> Result<(), NameError> {
    let prefix = || quoted_prefix(hostname);
    if hostname.is_empty() {
        return Err(NameError::EmptyHostname);
    }
    if hostname.len() > MAX_HOSTNAME_BYTES {
        return Err(NameError::HostnameTooLong {
            prefix: prefix(),
            length: hostname.len(),
        });
    }
    if let Some(character) = hostname
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.')))
    {
        return Err(NameError::InvalidCharacter {
            prefix: prefix(),
            character,
        });
    }
    for label in hostname.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel { prefix: prefix() });
        }
        if label.len() > MAX_HOSTNAME_LABEL_BYTES {
            return Err(NameError::LabelTooLong {
                prefix: prefix(),
                length: label.len(),
            });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(NameError::HyphenAtLabelEdge { prefix: prefix() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_hostnames_are_accepted() {
        for hostname in [
            "web-1",
            "db1.dc1.example.com",
            "0-host",
            "a",
            &"a".repeat(63),
            &[
                "x".repeat(63),
                "y".repeat(63),
                "z".repeat(63),
                "w".repeat(61),
            ]
            .join("."),
        ] {
            assert_eq!(validate_hostname(hostname), Ok(()), "{hostname}");
        }
    }

    #[test]
    fn each_problem_is_named() {
        let cases: [(&str, &str); 8] = [
            ("", "empty"),
            ("web..1", "empty label"),
            (".web", "empty label"),
            ("web.", "empty label"),
            ("-web", "starting or ending with '-'"),
            ("web-", "starting or ending with '-'"),
            ("web_1", "contains '_'"),
            ("web\u{1b}[31m", "contains '\\u{1b}'"),
        ];
        for (hostname, expected) in cases {
            let error = validate_hostname(hostname).unwrap_err().to_string();
            assert!(error.contains(expected), "{hostname:?}: {error}");
        }
        let long_label = validate_hostname(&"a".repeat(64)).unwrap_err();
        assert!(matches!(
            long_label,
            NameError::LabelTooLong { length: 64, .. }
        ));
    }

    #[test]
    fn a_huge_hostname_is_refused_quoting_only_a_prefix() {
        let hostname = "h".repeat(70_000);
        let error = validate_hostname(&hostname).unwrap_err();
        assert!(matches!(
            error,
            NameError::HostnameTooLong { length: 70_000, .. }
        ));
        let message = error.to_string();
        assert!(message.len() < 150, "{message}");
        assert!(
            message.contains(&format!("\"{}…\"", "h".repeat(32))),
            "{message}"
        );
        // 254 bytes of valid labels is one too many.
        let just_over = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62),
        ]
        .join(".");
        assert_eq!(just_over.len(), 254);
        assert!(validate_hostname(&just_over).is_err());
    }

    #[test]
    fn quoted_prefixes_escape_control_characters() {
        assert_eq!(quoted_prefix("a\nb"), "\"a\\nb\"");
        assert_eq!(
            quoted_prefix(&"é".repeat(40)),
            format!("\"{}…\"", "é".repeat(32))
        );
    }

    #[test]
    fn a_quoted_prefix_is_bounded_even_when_every_character_is_escaped() {
        // The input the fuzz target found: two unassigned code points and
        // control characters, each escaped to several characters.
        let found = "\u{9a451}\u{9a451}".to_owned() + &"\u{16}".repeat(63);
        let quoted = quoted_prefix(&found);
        assert!(quoted.chars().count() > 200, "{quoted}");
        assert!(quoted.chars().count() <= QUOTED_PREFIX_MAX_OUTPUT_CHARS);
        let worst = quoted_prefix(&"\u{10ffff}".repeat(40));
        assert_eq!(worst.chars().count(), QUOTED_PREFIX_MAX_OUTPUT_CHARS);
    }
}
