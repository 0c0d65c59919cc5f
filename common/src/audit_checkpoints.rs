//! Signed checkpoints of the audit chain, and the verification of a whole
//! log against them, page by page.
//!
//! A hash chain alone can be rewritten by anyone who can write the
//! database (edit an entry, recompute every later hash), and cannot show
//! its own truncation. So the server signs the chain head (`seq`, `hash`)
//! every N entries and every few minutes with an ed25519 *audit key* kept
//! in its data directory, never in the database. A reader then checks:
//!
//! * every checkpoint's signature, with the audit key it trusts;
//! * that the entry at each checkpoint's `seq` still has the signed hash
//!   (a rewritten entry changes every later hash, so the next checkpoint
//!   no longer matches);
//! * that no checkpoint names an entry past the end of the log (entries
//!   deleted from the end);
//! * that the log extends the last signed head the reader saw before
//!   (`flottectl` remembers it in the profile directory), which catches a
//!   truncation that also deleted the checkpoints after it.
//!
//! Pure functions only; signing keys are loaded by the server.

use std::collections::BTreeMap;

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditRecord, ChainBreak, ChainVerifier, UnixSeconds};

/// Versioned so that a signature over a checkpoint can never be taken for
/// one over anything else.
const CHECKPOINT_DOMAIN: &[u8] = b"flotte-audit-checkpoint-v1";

/// A signed chain head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCheckpoint {
    /// The entry signed: the chain head when the checkpoint was made.
    pub seq: u64,
    pub head_hash: String,
    pub at: UnixSeconds,
    /// [`key_id`] of the audit key that signed it.
    pub key_id: String,
    /// Lowercase hex ed25519 signature over [`checkpoint_message`].
    pub signature: String,
}

/// What a reader remembers between two verifications: the audit key it
/// trusts and the newest signed head it has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    /// Hex of the raw 32-byte ed25519 public key.
    pub public_key: String,
    pub seq: u64,
    pub head_hash: String,
}

fn push_field(message: &mut Vec<u8>, field: &[u8]) {
    message.extend_from_slice(&(field.len() as u64).to_be_bytes());
    message.extend_from_slice(field);
}

/// The bytes signed for a checkpoint (length-prefixed fields, domain first).
pub fn checkpoint_message(seq: u64, head_hash: &str, at: UnixSeconds) -> Vec<u8> {
    let mut message = Vec::new();
    push_field(&mut message, CHECKPOINT_DOMAIN);
    push_field(&mut message, &seq.to_be_bytes());
    push_field(&mut message, head_hash.as_bytes());
    push_field(&mut message, &at.to_be_bytes());
    message
}

/// A short name for an audit public key: hex of the first 8 bytes of its
/// SHA-256.
pub fn key_id(public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
    hex::encode(&digest.as_ref()[..8])
}

/// Signs the head `seq`/`head_hash` at `at`.
pub fn sign_checkpoint(
    key: &Ed25519KeyPair,
    seq: u64,
    head_hash: &str,
    at: UnixSeconds,
) -> AuditCheckpoint {
    let signature = key.sign(&checkpoint_message(seq, head_hash, at));
    AuditCheckpoint {
        seq,
        head_hash: head_hash.to_owned(),
        at,
        key_id: key_id(key.public_key().as_ref()),
        signature: hex::encode(signature.as_ref()),
    }
}

/// Why a log does not stand up to its checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogProblem {
    #[error(transparent)]
    Chain(#[from] ChainBreak),
    #[error("the audit public key {0:?} is not 32 bytes of hex")]
    BadPublicKey(String),
    #[error("the server's audit key changed: this profile trusts {remembered}, the server signs with {now} (a new key means new checkpoints nobody can check against the old ones; if the change is expected, remove the remembered head file)")]
    KeyChanged { remembered: String, now: String },
    #[error("checkpoint at entry {seq}: signed by key {key_id}, not by the audit key {expected}")]
    ForeignKey {
        seq: u64,
        key_id: String,
        expected: String,
    },
    #[error("checkpoint at entry {seq}: its signature does not verify (the checkpoint was forged or edited)")]
    BadSignature { seq: u64 },
    #[error("entry {seq}: its hash differs from the one signed at that entry (an entry up to {seq} was edited, deleted or inserted and the hashes recomputed)")]
    Rewritten { seq: u64 },
    #[error("entry {seq}: its hash differs from the signed head this profile saw before (the log was rewritten, or truncated and refilled)")]
    DoesNotExtend { seq: u64 },
    #[error("the log ends at entry {last} but entry {seq} was signed (entries were deleted: from the end, or anywhere and the rest renumbered)")]
    Truncated { seq: u64, last: u64 },
    #[error("the log ends at entry {last} but this profile saw a signed head at entry {seq} before (entries and checkpoints were deleted from the end)")]
    TruncatedBelowRemembered { seq: u64, last: u64 },
}

impl LogProblem {
    /// The entry the problem is about, if one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            LogProblem::Chain(broken) => Some(broken.seq()),
            LogProblem::ForeignKey { seq, .. }
            | LogProblem::BadSignature { seq }
            | LogProblem::Rewritten { seq }
            | LogProblem::DoesNotExtend { seq }
            | LogProblem::Truncated { seq, .. }
            | LogProblem::TruncatedBelowRemembered { seq, .. } => Some(*seq),
            LogProblem::BadPublicKey(_) | LogProblem::KeyChanged { .. } => None,
        }
    }
}

/// What a verified log proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSummary {
    pub entries: u64,
    pub head_hash: String,
    pub checkpoints: u64,
    /// The newest signed head, to remember for the next verification.
    pub signed_head: Option<SignedHead>,
}

/// Verifies a log fed page by page (checkpoints of a page first, then its
/// entries), keeping only what later entries need.
#[derive(Debug)]
pub struct LogVerifier {
    chain: ChainVerifier,
    public_key_hex: String,
    key_id: String,
    public_key: Vec<u8>,
    /// Checkpoints whose entry has not been seen yet.
    waiting: BTreeMap<u64, AuditCheckpoint>,
    remembered: Option<SignedHead>,
    checkpoints: u64,
    newest_signed: Option<(u64, String)>,
}

impl LogVerifier {
    /// `public_key_hex`: the server's audit key; `remembered`: what this
    /// reader saw last time (its key must be the same).
    pub fn new(public_key_hex: &str, remembered: Option<SignedHead>) -> Result<Self, LogProblem> {
        let public_key = hex::decode(public_key_hex)
            .ok()
            .filter(|bytes| bytes.len() == 32)
            .ok_or_else(|| LogProblem::BadPublicKey(public_key_hex.to_owned()))?;
        if let Some(remembered) = &remembered {
            if remembered.public_key != public_key_hex {
                return Err(LogProblem::KeyChanged {
                    remembered: remembered.public_key.clone(),
                    now: public_key_hex.to_owned(),
                });
            }
        }
        Ok(LogVerifier {
            chain: ChainVerifier::default(),
            public_key_hex: public_key_hex.to_owned(),
            key_id: key_id(&public_key),
            public_key,
            waiting: BTreeMap::new(),
            remembered,
            checkpoints: 0,
            newest_signed: None,
        })
    }

    /// Checks each checkpoint's signature and keeps it for its entry.
    pub fn add_checkpoints(
        &mut self,
        checkpoints: impl IntoIterator<Item = AuditCheckpoint>,
    ) -> Result<(), LogProblem> {
        for checkpoint in checkpoints {
            if checkpoint.key_id != self.key_id {
                return Err(LogProblem::ForeignKey {
                    seq: checkpoint.seq,
                    key_id: checkpoint.key_id,
                    expected: self.key_id.clone(),
                });
            }
            let signature = hex::decode(&checkpoint.signature).unwrap_or_default();
            signature::UnparsedPublicKey::new(&signature::ED25519, &self.public_key)
                .verify(
                    &checkpoint_message(checkpoint.seq, &checkpoint.head_hash, checkpoint.at),
                    &signature,
                )
                .map_err(|_| LogProblem::BadSignature {
                    seq: checkpoint.seq,
                })?;
            self.checkpoints += 1;
            self.waiting.insert(checkpoint.seq, checkpoint);
        }
        Ok(())
    }

    /// The next entry of the log.
    pub fn push_entry(&mut self, entry: &AuditRecord) -> Result<(), LogProblem> {
        self.chain.push(entry)?;
        if let Some(checkpoint) = self.waiting.remove(&entry.seq) {
            if checkpoint.head_hash != entry.hash {
                return Err(LogProblem::Rewritten { seq: entry.seq });
            }
            self.newest_signed = Some((entry.seq, entry.hash.clone()));
        }
        if let Some(remembered) = &self.remembered {
            if remembered.seq == entry.seq && remembered.head_hash != entry.hash {
                return Err(LogProblem::DoesNotExtend { seq: entry.seq });
            }
        }
        Ok(())
    }

    /// After the last page: nothing signed may lie past the end.
    pub fn finish(self) -> Result<LogSummary, LogProblem> {
        let summary = self.chain.summary();
        if let Some(seq) = self.waiting.keys().next() {
            return Err(LogProblem::Truncated {
                seq: *seq,
                last: summary.entries,
            });
        }
        if let Some(remembered) = &self.remembered {
            if remembered.seq > summary.entries {
                return Err(LogProblem::TruncatedBelowRemembered {
                    seq: remembered.seq,
                    last: summary.entries,
                });
            }
        }
        let public_key = self.public_key_hex;
        let signed_head = self
            .newest_signed
            .map(|(seq, head_hash)| SignedHead {
                public_key: public_key.clone(),
                seq,
                head_hash,
            })
            .or(self.remembered);
        Ok(LogSummary {
            entries: summary.entries,
            head_hash: summary.head_hash,
            checkpoints: self.checkpoints,
            signed_head,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::audit::{entry_hash, seal, AuditEvent};

    fn new_key() -> Ed25519KeyPair {
        let document = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(document.as_ref()).unwrap()
    }

    fn chain(length: u64) -> Vec<AuditRecord> {
        let mut entries: Vec<AuditRecord> = Vec::new();
        for n in 0..length {
            let event = AuditEvent {
                at: 1_000 + n as i64,
                actor: "admin".into(),
                role: "admin".into(),
                action: "token.create".into(),
                arguments_json: "{}".into(),
                result: "ok".into(),
            };
            let previous = entries.last().map(|last| (last.seq, last.hash.as_str()));
            entries.push(seal(event, previous));
        }
        entries
    }

    /// Checkpoints at every `every`th entry.
    fn checkpoints(
        key: &Ed25519KeyPair,
        log: &[AuditRecord],
        every: usize,
    ) -> Vec<AuditCheckpoint> {
        log.iter()
            .skip(every - 1)
            .step_by(every)
            .map(|entry| sign_checkpoint(key, entry.seq, &entry.hash, 5_000))
            .collect()
    }

    fn verify(
        key: &Ed25519KeyPair,
        log: &[AuditRecord],
        checkpoints: Vec<AuditCheckpoint>,
        remembered: Option<SignedHead>,
        page: usize,
    ) -> Result<LogSummary, LogProblem> {
        let mut verifier = LogVerifier::new(&hex::encode(key.public_key().as_ref()), remembered)?;
        let mut checkpoints = checkpoints;
        checkpoints.sort_by_key(|checkpoint| checkpoint.seq);
        let mut pages = log.chunks(page).peekable();
        let mut remaining = checkpoints.into_iter().peekable();
        while let Some(entries) = pages.next() {
            let last = entries.last().map_or(0, |entry| entry.seq);
            let is_last_page = pages.peek().is_none();
            let mut of_page = Vec::new();
            while let Some(checkpoint) =
                remaining.next_if(|checkpoint| is_last_page || checkpoint.seq <= last)
            {
                of_page.push(checkpoint);
            }
            verifier.add_checkpoints(of_page)?;
            for entry in entries {
                verifier.push_entry(entry)?;
            }
        }
        verifier.add_checkpoints(remaining)?;
        verifier.finish()
    }

    /// Recomputes every hash from `from` (an index) on, as someone who can
    /// write the database would after editing.
    fn rehash(log: &mut [AuditRecord]) {
        for index in 0..log.len() {
            let previous = if index == 0 {
                crate::audit::GENESIS_HASH.to_owned()
            } else {
                log[index - 1].hash.clone()
            };
            log[index].seq = index as u64 + 1;
            log[index].previous_hash = previous;
            log[index].hash =
                entry_hash(log[index].seq, &log[index].event, &log[index].previous_hash);
        }
    }

    #[test]
    fn an_untouched_log_verifies_in_any_page_size_and_names_its_signed_head() {
        let key = new_key();
        let log = chain(10);
        for page in [1, 3, 10, 100] {
            let summary = verify(&key, &log, checkpoints(&key, &log, 4), None, page).unwrap();
            assert_eq!(summary.entries, 10);
            assert_eq!(summary.checkpoints, 2);
            let head = summary.signed_head.unwrap();
            assert_eq!((head.seq, head.head_hash), (8, log[7].hash.clone()));
        }
    }

    #[test]
    fn rewriting_deleting_truncating_and_forging_are_each_named() {
        let key = new_key();
        let log = chain(10);
        let signed = checkpoints(&key, &log, 4);
        let remembered = verify(&key, &log, signed.clone(), None, 3)
            .unwrap()
            .signed_head;
        type Tamper = fn(&mut Vec<AuditRecord>, &mut Vec<AuditCheckpoint>);
        let cases: Vec<(&str, Tamper, &str)> = vec![
            (
                "edited and rehashed",
                |log, _| {
                    log[2].event.actor = "mallory".into();
                    rehash(log);
                },
                "entry 4: its hash differs from the one signed",
            ),
            (
                "deleted and renumbered",
                |log, _| {
                    log.remove(5);
                    rehash(log);
                },
                "entry 8: its hash differs from the one signed",
            ),
            (
                "truncated",
                |log, _| log.truncate(6),
                "the log ends at entry 6 but entry 8 was signed",
            ),
            (
                "truncated with its checkpoints",
                |log, checkpoints| {
                    log.truncate(6);
                    checkpoints.retain(|checkpoint| checkpoint.seq <= 6);
                },
                "this profile saw a signed head at entry 8",
            ),
            (
                "rewritten with its checkpoints deleted",
                |log, checkpoints| {
                    log[0].event.result = "denied".into();
                    rehash(log);
                    checkpoints.clear();
                },
                "entry 8: its hash differs from the signed head this profile saw",
            ),
            (
                "forged checkpoint",
                |_, checkpoints| checkpoints[0].head_hash = "00".repeat(32),
                "checkpoint at entry 4: its signature does not verify",
            ),
        ];
        for (name, tamper, expected) in cases {
            let mut log = log.clone();
            let mut checkpoints = signed.clone();
            tamper(&mut log, &mut checkpoints);
            let error = verify(&key, &log, checkpoints, remembered.clone(), 3).unwrap_err();
            assert!(error.to_string().contains(expected), "{name}: {error}");
        }
    }

    #[test]
    fn another_key_is_refused_for_checkpoints_and_for_the_remembered_head() {
        let key = new_key();
        let other = new_key();
        let log = chain(4);
        let error = verify(&key, &log, checkpoints(&other, &log, 2), None, 10).unwrap_err();
        assert!(
            matches!(error, LogProblem::ForeignKey { seq: 2, .. }),
            "{error}"
        );
        let remembered = SignedHead {
            public_key: hex::encode(other.public_key().as_ref()),
            seq: 2,
            head_hash: log[1].hash.clone(),
        };
        let error = verify(&key, &log, Vec::new(), Some(remembered), 10).unwrap_err();
        assert!(matches!(error, LogProblem::KeyChanged { .. }), "{error}");
    }
}
