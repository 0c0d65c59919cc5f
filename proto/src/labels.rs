//! Label and selector syntax shared by the CLI, the server and join tokens.
//!
//! Labels are `key=value` pairs written comma-separated (`env=prod,role=web`).
//! A selector is the same syntax and matches a machine that carries every pair.
//! Keeping the grammar here means every process agrees on what a selector means.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error("label {0:?} is not of the form key=value")]
    MissingEquals(String),
    #[error("label key {0:?} is invalid: use letters, digits, '.', '_', '-' or '/' (at most 63 characters)")]
    InvalidKey(String),
    #[error("label value {value:?} of key {key:?} is invalid: use letters, digits, '.', '_' or '-' (at most 63 characters)")]
    InvalidValue { key: String, value: String },
    #[error("label key {0:?} is given twice")]
    Duplicate(String),
}

fn is_valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 63
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

fn is_valid_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks one key/value pair, as stored in a token or on a machine.
pub fn validate_label(key: &str, value: &str) -> Result<(), LabelError> {
    if !is_valid_label_key(key) {
        return Err(LabelError::InvalidKey(key.to_owned()));
    }
    if !is_valid_label_value(value) {
        return Err(LabelError::InvalidValue {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Parses `k=v,k2=v2` (whitespace around items is ignored; empty input is no labels).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, LabelError> {
    let mut labels = BTreeMap::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| LabelError::MissingEquals(item.to_owned()))?;
        let (key, value) = (key.trim(), value.trim());
        validate_label(key, value)?;
        if labels.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(LabelError::Duplicate(key.to_owned()));
        }
    }
    Ok(labels)
}

/// Formats labels back into the `k=v,k2=v2` syntax, keys sorted.
pub fn format_labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<_> = labels.into_iter().collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A conjunction of required `key=value` pairs. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    required: BTreeMap<String, String>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, LabelError> {
        Ok(Selector {
            required: parse_labels(text)?,
        })
    }

    /// `zone` is matched by the pseudo-label `zone=...` so that selectors can
    /// name a datacenter without every machine carrying a zone label.
    pub fn matches<'a>(&self, labels: impl Fn(&str) -> Option<&'a str>, zone: &str) -> bool {
        self.required.iter().all(|(key, value)| {
            if key == "zone" {
                labels(key).unwrap_or(zone) == value
            } else {
                labels(key) == Some(value.as_str())
            }
        })
    }

    pub fn matches_map<S: std::hash::BuildHasher>(
        &self,
        labels: &std::collections::HashMap<String, String, S>,
        zone: &str,
    ) -> bool {
        self.matches(|key| labels.get(key).map(String::as_str), zone)
    }

    pub fn is_empty(&self) -> bool {
        self.required.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn parses_and_formats_labels() {
        let labels = parse_labels(" role=web, env=prod ").unwrap();
        assert_eq!(labels.get("env").map(String::as_str), Some("prod"));
        assert_eq!(format_labels(&labels), "env=prod,role=web");
        assert!(parse_labels("").unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_labels_naming_the_problem() {
        assert_eq!(
            parse_labels("env"),
            Err(LabelError::MissingEquals("env".into()))
        );
        assert_eq!(
            parse_labels("e nv=x"),
            Err(LabelError::InvalidKey("e nv".into()))
        );
        assert!(matches!(
            parse_labels("env=a b"),
            Err(LabelError::InvalidValue { .. })
        ));
        assert_eq!(
            parse_labels("a=1,a=2"),
            Err(LabelError::Duplicate("a".into()))
        );
    }

    #[test]
    fn selector_requires_every_pair_and_knows_zone() {
        let machine: HashMap<String, String> = [
            ("env".to_owned(), "prod".to_owned()),
            ("role".to_owned(), "web".to_owned()),
        ]
        .into();
        let cases = [
            ("", true),
            ("env=prod", true),
            ("env=prod,role=web", true),
            ("env=prod,role=db", false),
            ("zone=dc1", true),
            ("zone=dc2", false),
            ("team=x", false),
        ];
        for (selector, expected) in cases {
            let selector = Selector::parse(selector).unwrap();
            assert_eq!(
                selector.matches_map(&machine, "dc1"),
                expected,
                "{selector:?}"
            );
        }
    }
}
