//! Join tokens as credentials: minting (random id and secret, only the
//! secret's hash kept) and hashing. Shared by the tokens service and the
//! remediation loop (a replacement machine enrolls with a one-use token).

use std::collections::BTreeMap;

use flotte_proto::join_token::JoinToken;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

use crate::store::{JoinTokenRecord, UnixSeconds};

/// The system's random number generator failed: nothing can be minted.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomFailed;

/// SHA-256 of a token secret, as stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, secret.as_bytes()))
}

fn random_hex(bytes: usize) -> Result<String, RandomFailed> {
    let mut buffer = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buffer)
        .map_err(|_| RandomFailed)?;
    Ok(hex::encode(buffer))
}

/// A new join token (not stored yet): its record, with only the secret's
/// hash, and the token text to hand out.
pub fn mint_join_token(
    now: UnixSeconds,
    ca_fingerprint: &str,
    labels: &BTreeMap<String, String>,
    zone: &str,
    ttl_seconds: u64,
    uses: u32,
) -> Result<(JoinTokenRecord, JoinToken), RandomFailed> {
    let secret = random_hex(16)?;
    let record = JoinTokenRecord {
        id: random_hex(6)?,
        secret_hash: hash_secret(&secret),
        labels: labels.clone(),
        zone: zone.to_owned(),
        created_at: now,
        expires_at: now.saturating_add(i64::try_from(ttl_seconds).unwrap_or(i64::MAX)),
        uses_allowed: uses.max(1),
        uses_done: 0,
        revoked: false,
        revoked_at: None,
        last_used_at: None,
    };
    let token = JoinToken {
        id: record.id.clone(),
        secret,
        ca_fingerprint: ca_fingerprint.to_owned(),
    };
    Ok((record, token))
}
