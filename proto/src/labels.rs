//! Label and selector syntax shared by the CLI, the server and join tokens.
//!
//! Labels are `key=value` pairs written comma-separated (`env=prod,role=web`).
//! A selector is kubectl's grammar: comma-separated requirements `k=v`
//! (`k==v`), `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` (present) and `!k`
//! (absent), all of which a machine must meet. Keeping the grammar here means
//! every process — plans, grants, remediation rules, flottectl — agrees on what
//! a selector means; nothing else may parse one.

use std::collections::{BTreeMap, BTreeSet};

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
    #[error("selector near {near}: {problem}")]
    SelectorSyntax { problem: &'static str, near: String },
    #[error("selector {near} is {length} bytes long, more than 4096")]
    SelectorTooLong { length: usize, near: String },
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

/// The longest selector text accepted, in bytes: a selector comes from an
/// operator's argument or a stored grant, and is parsed on every match pass.
pub const MAX_SELECTOR_BYTES: usize = 4096;

/// The most values one `in (…)` or `notin (…)` set may hold.
pub const MAX_SELECTOR_SET_VALUES: usize = 64;

/// One requirement of a selector, kubectl's forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` (or `key==value`): the label is present with this value.
    Equals { key: String, value: String },
    /// `key!=value`: the label is absent or has another value.
    NotEquals { key: String, value: String },
    /// `key in (a,b)`: the label is present with one of these values.
    In {
        key: String,
        values: BTreeSet<String>,
    },
    /// `key notin (a,b)`: the label is absent or has none of these values.
    NotIn {
        key: String,
        values: BTreeSet<String>,
    },
    /// `key`: the label is present, whatever its value.
    Exists { key: String },
    /// `!key`: the label is absent.
    DoesNotExist { key: String },
}

impl Requirement {
    fn key(&self) -> &str {
        match self {
            Requirement::Equals { key, .. }
            | Requirement::NotEquals { key, .. }
            | Requirement::In { key, .. }
            | Requirement::NotIn { key, .. }
            | Requirement::Exists { key }
            | Requirement::DoesNotExist { key } => key,
        }
    }

    /// Whether a machine whose label `key` has `value` (`None`: absent)
    /// meets this requirement.
    fn accepts(&self, value: Option<&str>) -> bool {
        match self {
            Requirement::Equals { value: wanted, .. } => value == Some(wanted.as_str()),
            Requirement::NotEquals { value: refused, .. } => value != Some(refused.as_str()),
            Requirement::In { values, .. } => value.is_some_and(|value| values.contains(value)),
            Requirement::NotIn { values, .. } => !value.is_some_and(|value| values.contains(value)),
            Requirement::Exists { .. } => value.is_some(),
            Requirement::DoesNotExist { .. } => value.is_none(),
        }
    }
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |values: &BTreeSet<String>| values.iter().cloned().collect::<Vec<_>>().join(",");
        match self {
            Requirement::Equals { key, value } => write!(formatter, "{key}={value}"),
            Requirement::NotEquals { key, value } => write!(formatter, "{key}!={value}"),
            Requirement::In { key, values } => write!(formatter, "{key} in ({})", set(values)),
            Requirement::NotIn { key, values } => {
                write!(formatter, "{key} notin ({})", set(values))
            }
            Requirement::Exists { key } => write!(formatter, "{key}"),
            Requirement::DoesNotExist { key } => write!(formatter, "!{key}"),
        }
    }
}

/// A conjunction of requirements, kubectl's grammar:
/// `role=web,env!=prod,zone in (dc1,dc2),tier notin (gold),canary,!legacy`.
/// The empty selector matches everything. Plans, grants, remediation rules
/// and every `--selector` of flottectl parse it here, so that they all agree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// A selector's text cut at its top-level commas (those outside `( )`).
fn split_requirements(text: &str) -> Result<Vec<&str>, LabelError> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, byte) in text.bytes().enumerate() {
        match byte {
            b'(' if depth == 0 => depth = 1,
            b'(' => return Err(syntax("nested '(' in a value set", &text[start..])),
            b')' if depth == 0 => return Err(syntax("')' without '('", &text[start..])),
            b')' => depth = 0,
            b',' if depth == 0 => {
                items.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(syntax("'(' is never closed", &text[start..]));
    }
    items.push(&text[start..]);
    Ok(items)
}

fn syntax(problem: &'static str, near: &str) -> LabelError {
    LabelError::SelectorSyntax {
        problem,
        near: crate::names::quoted_prefix(near.trim()),
    }
}

/// `text` when `is_valid` says so, or the syntax error `problem` naming the
/// requirement `item`.
fn checked(
    text: &str,
    is_valid: fn(&str) -> bool,
    problem: &'static str,
    item: &str,
) -> Result<String, LabelError> {
    is_valid(text)
        .then(|| text.to_owned())
        .ok_or_else(|| syntax(problem, item))
}

fn selector_key(key: &str, item: &str) -> Result<String, LabelError> {
    checked(
        key,
        is_valid_label_key,
        "the key is missing or invalid (letters, digits, '.', '_', '-', '/'; at most 63)",
        item,
    )
}

fn selector_value(value: &str, item: &str) -> Result<String, LabelError> {
    checked(
        value,
        is_valid_label_value,
        "a value is invalid (letters, digits, '.', '_', '-'; at most 63)",
        item,
    )
}

/// The values of `(a,b)` in `rest` (after `in` or `notin`).
fn value_set(rest: &str, item: &str) -> Result<BTreeSet<String>, LabelError> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| syntax("expected a value set in parentheses, as (a,b)", item))?;
    let values: Vec<&str> = inner.split(',').map(str::trim).collect();
    if values.len() > MAX_SELECTOR_SET_VALUES {
        return Err(syntax("a value set holds more than 64 values", item));
    }
    if values.iter().any(|value| value.is_empty()) {
        return Err(syntax("a value set has an empty value", item));
    }
    values
        .into_iter()
        .map(|value| selector_value(value, item))
        .collect()
}

/// One requirement, trimmed and not empty.
fn parse_requirement(item: &str) -> Result<Requirement, LabelError> {
    if let Some(key) = item.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist {
            key: selector_key(key.trim(), item)?,
        });
    }
    let key_end = item
        .find(|character: char| {
            !(character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-' | '/'))
        })
        .unwrap_or(item.len());
    let key = selector_key(&item[..key_end], item)?;
    let rest = item[key_end..].trim_start();
    let value = |operator: &str| selector_value(rest[operator.len()..].trim(), item);
    if rest.is_empty() {
        Ok(Requirement::Exists { key })
    } else if rest.starts_with("!=") {
        Ok(Requirement::NotEquals {
            value: value("!=")?,
            key,
        })
    } else if rest.starts_with("==") {
        Ok(Requirement::Equals {
            value: value("==")?,
            key,
        })
    } else if rest.starts_with('=') {
        Ok(Requirement::Equals {
            value: value("=")?,
            key,
        })
    } else if let Some(set) = word_then(rest, "notin") {
        Ok(Requirement::NotIn {
            values: value_set(set, item)?,
            key,
        })
    } else if let Some(set) = word_then(rest, "in") {
        Ok(Requirement::In {
            values: value_set(set, item)?,
            key,
        })
    } else {
        Err(syntax(
            "expected =, ==, !=, in (…) or notin (…) after the key",
            item,
        ))
    }
}

/// What follows the operator `word` at the start of `text`, when the word
/// stands alone (followed by a space or `(`), as in `in (a)`.
fn word_then<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    text.strip_prefix(word).filter(|rest| {
        rest.starts_with(|character: char| character.is_whitespace() || character == '(')
    })
}

impl Selector {
    /// Parses a selector; `k=v,k2=v2` keeps the meaning it always had. A
    /// refusal names the problem and quotes the start of the requirement.
    pub fn parse(text: &str) -> Result<Self, LabelError> {
        if text.len() > MAX_SELECTOR_BYTES {
            return Err(LabelError::SelectorTooLong {
                length: text.len(),
                near: crate::names::quoted_prefix(text),
            });
        }
        let mut requirements: Vec<Requirement> = Vec::new();
        for item in split_requirements(text)?
            .into_iter()
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let requirement = parse_requirement(item)?;
            // Two equalities on one key were refused before this grammar
            // (`a=1,a=2` is a typo, never a wish to match nothing).
            if let Requirement::Equals { key, .. } = &requirement {
                let repeated = requirements.iter().any(|earlier| {
                    matches!(earlier, Requirement::Equals { key: earlier, .. } if earlier == key)
                });
                if repeated {
                    return Err(LabelError::Duplicate(key.clone()));
                }
            }
            requirements.push(requirement);
        }
        Ok(Selector { requirements })
    }

    /// `zone` is matched by the pseudo-label `zone=...` so that selectors can
    /// name a datacenter without every machine carrying a zone label: every
    /// machine has a zone, so `zone` always exists.
    pub fn matches<'a>(&self, labels: impl Fn(&str) -> Option<&'a str>, zone: &str) -> bool {
        self.requirements.iter().all(|requirement| {
            let key = requirement.key();
            let value = if key == "zone" {
                Some(labels(key).unwrap_or(zone))
            } else {
                labels(key)
            };
            requirement.accepts(value)
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
        self.requirements.is_empty()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

/// The canonical text (`key=value`, `key!=value`, `key in (a,b)`, …, in the
/// order given), which parses back to the same selector.
impl std::fmt::Display for Selector {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, requirement) in self.requirements.iter().enumerate() {
            if index > 0 {
                formatter.write_str(",")?;
            }
            write!(formatter, "{requirement}")?;
        }
        Ok(())
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

    fn machine(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn selector_forms_parse_to_their_requirements_and_print_back() {
        let set = |values: &[&str]| values.iter().map(|value| (*value).to_owned()).collect();
        let equals = |key: &str, value: &str| Requirement::Equals {
            key: key.into(),
            value: value.into(),
        };
        let exists = |key: &str| Requirement::Exists { key: key.into() };
        let cases: Vec<(&str, Vec<Requirement>, &str)> = vec![
            ("", vec![], ""),
            ("role=web", vec![equals("role", "web")], "role=web"),
            (" role == web ", vec![equals("role", "web")], "role=web"),
            (
                "env!=prod",
                vec![Requirement::NotEquals {
                    key: "env".into(),
                    value: "prod".into(),
                }],
                "env!=prod",
            ),
            (
                "zone in (dc2, dc1)",
                vec![Requirement::In {
                    key: "zone".into(),
                    values: set(&["dc1", "dc2"]),
                }],
                "zone in (dc1,dc2)",
            ),
            (
                "tier notin(gold)",
                vec![Requirement::NotIn {
                    key: "tier".into(),
                    values: set(&["gold"]),
                }],
                "tier notin (gold)",
            ),
            (
                "canary,!legacy",
                vec![
                    exists("canary"),
                    Requirement::DoesNotExist {
                        key: "legacy".into(),
                    },
                ],
                "canary,!legacy",
            ),
            (
                "in in (in),notin",
                vec![
                    Requirement::In {
                        key: "in".into(),
                        values: set(&["in"]),
                    },
                    exists("notin"),
                ],
                "in in (in),notin",
            ),
            ("a=1,,b=", vec![equals("a", "1"), equals("b", "")], "a=1,b="),
        ];
        for (text, requirements, printed) in cases {
            let selector = Selector::parse(text).unwrap();
            assert_eq!(selector.requirements(), requirements.as_slice(), "{text}");
            assert_eq!(selector.to_string(), printed, "{text}");
            assert_eq!(Selector::parse(printed).unwrap(), selector, "{printed}");
        }
    }

    #[test]
    fn selector_refusals_name_the_problem_and_quote_a_short_prefix() {
        let long_key = format!("{}=x", "k".repeat(64));
        let too_long = format!("a in ({})", vec!["v"; 2100].join(","));
        let many = format!("a in ({})", vec!["v"; 65].join(","));
        let cases: Vec<(&str, &str)> = vec![
            (
                "e nv=x",
                "expected =, ==, !=, in (…) or notin (…) after the key",
            ),
            ("env=a b", "a value is invalid"),
            ("=web", "the key is missing or invalid"),
            ("!", "the key is missing or invalid"),
            ("!legacy=1", "the key is missing or invalid"),
            (&long_key, "the key is missing or invalid"),
            ("zone in dc1", "expected a value set in parentheses"),
            ("zone in (dc1", "'(' is never closed"),
            ("zone in ((dc1))", "nested '('"),
            ("zone)", "')' without '('"),
            ("zone in ()", "a value set has an empty value"),
            ("zone in (a,,b)", "a value set has an empty value"),
            ("zone notin (a b)", "a value is invalid"),
            (&many, "more than 64 values"),
            ("a=1,a=2", "given twice"),
            (&too_long, "more than 4096"),
        ];
        for (text, problem) in cases {
            let message = Selector::parse(text).unwrap_err().to_string();
            assert!(message.contains(problem), "{text:?}: {message}");
            assert!(message.len() < 250, "{text:?}: a short message: {message}");
        }
        let message = Selector::parse("role=web,env=a b").unwrap_err().to_string();
        assert!(
            message.contains("\"env=a b\""),
            "the requirement is quoted: {message}"
        );
    }

    #[test]
    fn selector_forms_match_like_kubectl() {
        let web = machine(&[("role", "web"), ("env", "staging"), ("canary", "")]);
        let db = machine(&[
            ("role", "db"),
            ("env", "prod"),
            ("tier", "gold"),
            ("legacy", "yes"),
        ]);
        let bare = machine(&[]);
        // (selector, web in dc1, db in dc2, bare in dc3)
        let cases = [
            ("env!=prod", true, false, true),
            ("role in (web,db)", true, true, false),
            ("role notin (db)", true, false, true),
            ("tier notin (gold)", true, false, true),
            ("canary", true, false, false),
            ("!legacy", true, false, true),
            ("!role", false, false, true),
            ("zone in (dc1,dc2)", true, true, false),
            ("zone notin (dc1)", false, true, true),
            ("zone", true, true, true),
            ("!zone", false, false, false),
            ("zone!=dc3", true, true, false),
            (
                "role=web,env!=prod,zone in (dc1,dc2),tier notin (gold),canary,!legacy",
                true,
                false,
                false,
            ),
        ];
        for (text, on_web, on_db, on_bare) in cases {
            let selector = Selector::parse(text).unwrap();
            assert_eq!(selector.matches_map(&web, "dc1"), on_web, "{text} on web");
            assert_eq!(selector.matches_map(&db, "dc2"), on_db, "{text} on db");
            assert_eq!(
                selector.matches_map(&bare, "dc3"),
                on_bare,
                "{text} on bare"
            );
        }
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
