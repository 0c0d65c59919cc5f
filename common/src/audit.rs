//! The audit log's hash chain: what an entry is, how its hash is computed,
//! and the verification of a whole log — pure functions over entries, so
//! that `flottectl audit verify` checks the chain on the operator's side
//! with the same code the server uses to seal it.
//!
//! Each entry's hash is SHA-256 over a length-prefixed encoding of every
//! field *including the previous entry's hash*: editing, deleting or
//! reordering any entry breaks the chain at that point. Storage and the API
//! live elsewhere; nothing here does I/O.

use ring::digest;
use serde::Serialize;

/// Seconds since the Unix epoch, as the store keeps times.
pub type UnixSeconds = i64;

/// The `previous_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Versioned so that a future change of encoding cannot be confused with this one.
const HASH_DOMAIN: &[u8] = b"flotte-audit-v1";

/// What happened, as the caller describes it, before the store numbers and
/// seals it into an [`AuditRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    pub at: UnixSeconds,
    /// The operator's name (or a local actor such as `flotte-server init`).
    pub actor: String,
    /// The actor's role when it acted (`none` for an unknown operator).
    pub role: String,
    pub action: String,
    /// The call's arguments as a JSON object, secrets left out.
    pub arguments_json: String,
    /// `ok`, `ok: detail`, `denied: why` or `failed: why`.
    pub result: String,
}

/// A sealed entry, as stored: its place in the chain, the event, the links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub seq: u64,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub previous_hash: String,
    pub hash: String,
}

/// Which entries a listing wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Entries at or after this time.
    pub since: Option<UnixSeconds>,
    /// Entries by this actor.
    pub actor: Option<String>,
    /// Entries after this one (paging).
    pub after_seq: Option<u64>,
    /// At most this many entries.
    pub limit: Option<u32>,
}

fn push_field(context: &mut digest::Context, field: &[u8]) {
    context.update(&(field.len() as u64).to_be_bytes());
    context.update(field);
}

/// The hash of an entry: lowercase hex SHA-256 over the domain tag and every
/// field, each prefixed by its length (so that no two field splits collide).
pub fn entry_hash(seq: u64, event: &AuditEvent, previous_hash: &str) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    push_field(&mut context, HASH_DOMAIN);
    push_field(&mut context, &seq.to_be_bytes());
    push_field(&mut context, &event.at.to_be_bytes());
    for text in [
        &event.actor,
        &event.role,
        &event.action,
        &event.arguments_json,
        &event.result,
    ] {
        push_field(&mut context, text.as_bytes());
    }
    push_field(&mut context, previous_hash.as_bytes());
    hex::encode(context.finish())
}

/// Numbers and seals an event as the entry after `previous` (`None`: the first).
pub fn seal(event: AuditEvent, previous: Option<(u64, &str)>) -> AuditRecord {
    let (seq, previous_hash) = match previous {
        Some((seq, hash)) => (seq + 1, hash.to_owned()),
        None => (1, GENESIS_HASH.to_owned()),
    };
    let hash = entry_hash(seq, &event, &previous_hash);
    AuditRecord {
        seq,
        event,
        previous_hash,
        hash,
    }
}

/// The first place where a log stops being the chain it was written as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error("entry {seq}: its contents do not match its hash (the entry was edited)")]
    Edited { seq: u64 },
    #[error("entry {seq}: it does not follow entry {expected_after} (entries were deleted or reordered: expected entry {expected})")]
    OutOfSequence {
        seq: u64,
        expected_after: u64,
        expected: u64,
    },
    #[error("entry {seq}: the log does not start at entry 1 (earlier entries were deleted)")]
    MissingStart { seq: u64 },
    #[error("entry {seq}: its link to the previous entry is broken (the previous entry was edited, or entries were replaced)")]
    BrokenLink { seq: u64 },
}

impl ChainBreak {
    /// The entry at which the chain breaks.
    pub fn seq(&self) -> u64 {
        match self {
            ChainBreak::Edited { seq }
            | ChainBreak::OutOfSequence { seq, .. }
            | ChainBreak::MissingStart { seq }
            | ChainBreak::BrokenLink { seq } => *seq,
        }
    }
}

/// What an intact log proves: how many entries, and the last hash (record it
/// elsewhere to detect a later truncation, which a chain alone cannot show).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    pub entries: u64,
    pub head_hash: String,
}

/// Verifies a log entry by entry, keeping only the previous entry, so that
/// a log of any size can be checked page by page.
#[derive(Debug, Clone, Default)]
pub struct ChainVerifier {
    previous: Option<(u64, String)>,
}

impl ChainVerifier {
    /// A verifier that resumes after an entry already trusted (`seq`,
    /// `hash`), e.g. a signed checkpoint.
    pub fn after(seq: u64, hash: &str) -> Self {
        ChainVerifier {
            previous: Some((seq, hash.to_owned())),
        }
    }

    /// The next entry; the first broken one is named.
    pub fn push(&mut self, entry: &AuditRecord) -> Result<(), ChainBreak> {
        match &self.previous {
            None if entry.seq != 1 => return Err(ChainBreak::MissingStart { seq: entry.seq }),
            Some((before, _)) if entry.seq != before + 1 => {
                return Err(ChainBreak::OutOfSequence {
                    seq: entry.seq,
                    expected_after: *before,
                    expected: before + 1,
                })
            }
            _ => {}
        }
        let expected_previous = self
            .previous
            .as_ref()
            .map_or(GENESIS_HASH, |(_, hash)| hash.as_str());
        if entry.hash != entry_hash(entry.seq, &entry.event, &entry.previous_hash) {
            return Err(ChainBreak::Edited { seq: entry.seq });
        }
        if entry.previous_hash != expected_previous {
            return Err(ChainBreak::BrokenLink { seq: entry.seq });
        }
        self.previous = Some((entry.seq, entry.hash.clone()));
        Ok(())
    }

    /// What the entries pushed so far prove.
    pub fn summary(&self) -> ChainSummary {
        ChainSummary {
            entries: self.previous.as_ref().map_or(0, |(seq, _)| *seq),
            head_hash: self
                .previous
                .as_ref()
                .map_or_else(|| GENESIS_HASH.to_owned(), |(_, hash)| hash.clone()),
        }
    }
}

/// Verifies a whole log, in the order given (the store lists by `seq`), and
/// names the first broken entry.
pub fn verify_chain(entries: &[AuditRecord]) -> Result<ChainSummary, ChainBreak> {
    let mut verifier = ChainVerifier::default();
    for entry in entries {
        verifier.push(entry)?;
    }
    Ok(verifier.summary())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: i64) -> AuditEvent {
        AuditEvent {
            at: 1_000 + n,
            actor: "admin".into(),
            role: "admin".into(),
            action: "token.create".into(),
            arguments_json: format!(r#"{{"zone":"dc{n}"}}"#),
            result: "ok".into(),
        }
    }

    fn chain(length: i64) -> Vec<AuditRecord> {
        let mut entries: Vec<AuditRecord> = Vec::new();
        for n in 0..length {
            let previous = entries.last().map(|last| (last.seq, last.hash.as_str()));
            let sealed = seal(event(n), previous);
            entries.push(sealed);
        }
        entries
    }

    #[test]
    fn verification_names_the_first_broken_entry() {
        type Tamper = fn(&mut Vec<AuditRecord>);
        /// Entries of an intact log, or the broken entry and words of the reason.
        type Expected = Result<u64, (u64, &'static str)>;
        let cases: &[(&str, Tamper, Expected)] = &[
            ("untouched", |_| {}, Ok(5)),
            ("empty", |log| log.clear(), Ok(0)),
            (
                "edited result",
                |log| log[2].event.result = "denied".into(),
                Err((3, "edited")),
            ),
            (
                "edited time",
                |log| log[0].event.at += 1,
                Err((1, "edited")),
            ),
            (
                "edited and re-hashed",
                |log| {
                    log[1].event.actor = "mallory".into();
                    log[1].hash = entry_hash(2, &log[1].event, &log[1].previous_hash);
                },
                Err((3, "link")),
            ),
            (
                "deleted in the middle",
                |log| {
                    log.remove(2);
                },
                Err((4, "deleted or reordered")),
            ),
            (
                "deleted first",
                |log| {
                    log.remove(0);
                },
                Err((2, "does not start at entry 1")),
            ),
            (
                "reordered",
                |log| log.swap(1, 2),
                Err((3, "deleted or reordered")),
            ),
            (
                "renumbered after a deletion",
                |log| {
                    log.remove(1);
                    for (index, entry) in log.iter_mut().enumerate() {
                        entry.seq = index as u64 + 1;
                    }
                },
                Err((2, "edited")),
            ),
        ];
        for (name, tamper, expected) in cases {
            let mut log = chain(5);
            tamper(&mut log);
            match (verify_chain(&log), expected) {
                (Ok(summary), Ok(entries)) => {
                    assert_eq!(summary.entries, *entries, "{name}");
                }
                (Err(broken), Err((seq, words))) => {
                    assert_eq!(broken.seq(), *seq, "{name}: {broken}");
                    assert!(broken.to_string().contains(words), "{name}: {broken}");
                }
                (got, _) => panic!("{name}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn the_head_hash_is_the_last_entry_s() {
        let log = chain(3);
        let summary = verify_chain(&log).unwrap();
        assert_eq!(summary.head_hash, log[2].hash);
        assert_eq!(log[0].previous_hash, GENESIS_HASH);
        assert_eq!(log[1].previous_hash, log[0].hash);
    }

    #[test]
    fn field_boundaries_are_part_of_the_hash() {
        let mut a = event(0);
        a.actor = "ad".into();
        a.role = "minx".into();
        let mut b = event(0);
        b.actor = "admi".into();
        b.role = "nx".into();
        // Both concatenate to "adminx": only the length prefixes tell them apart.
        assert_ne!(
            entry_hash(1, &a, GENESIS_HASH),
            entry_hash(1, &b, GENESIS_HASH)
        );
    }
}
