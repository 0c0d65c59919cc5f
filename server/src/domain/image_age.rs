//! How old an image is: the creation time its signed manifest carries, and
//! how many machines run an image built longer ago than the fleet's
//! threshold (an image nobody rebuilt is a security risk nobody sees in a
//! list of versions).
//!
//! What must never live here: a clock read or a store read; callers pass
//! `now` and the creation times they know.

use std::time::Duration;

use flotte_proto::image::Manifest;

use crate::store::UnixSeconds;

/// The manifest's `created_at` in seconds since the Unix epoch; 0 when it
/// cannot be read (such an image is never counted as old).
pub fn manifest_created_at(manifest_json: &[u8]) -> UnixSeconds {
    serde_json::from_slice::<Manifest>(manifest_json)
        .ok()
        .and_then(|manifest| humantime::parse_rfc3339(&manifest.created_at).ok())
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |duration| i64::try_from(duration.as_secs()).unwrap_or(0))
}

/// Whether an image created at `created_at` is older than `max_age` at `now`.
pub fn is_old(created_at: UnixSeconds, now: UnixSeconds, max_age: Duration) -> bool {
    let max_age = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
    created_at > 0 && now.saturating_sub(created_at) > max_age
}

/// How many of the machines (the creation time of the image each runs, if
/// known) run an old image.
pub fn machines_on_old_images(
    running: impl IntoIterator<Item = Option<UnixSeconds>>,
    now: UnixSeconds,
    max_age: Duration,
) -> u64 {
    running
        .into_iter()
        .flatten()
        .filter(|created_at| is_old(*created_at, now, max_age))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn an_image_is_old_past_the_threshold_and_unknown_ages_never_count() {
        let now = 1_800_000_000;
        let max_age = Duration::from_secs(30 * 86_400);
        let cases = [
            (now - 31 * DAY, true),
            (now - 30 * DAY, false),
            (now - DAY, false),
            (now + DAY, false), // built "in the future" by a skewed clock
            (0, false),         // creation time unreadable
        ];
        for (created_at, old) in cases {
            assert_eq!(is_old(created_at, now, max_age), old, "{created_at}");
        }
        let running = [
            Some(now - 40 * DAY),
            Some(now - DAY),
            None,
            Some(now - 31 * DAY),
        ];
        assert_eq!(machines_on_old_images(running, now, max_age), 2);
    }

    #[test]
    fn the_creation_time_comes_from_the_manifest() {
        let manifest = br#"{"format":1,"name":"app","version":"1.0.0","payload_sha256":"aa","payload_size":1,"created_at":"2026-11-30T00:00:00Z","signing_key":"k"}"#;
        assert_eq!(manifest_created_at(manifest), 1_795_996_800);
        assert_eq!(manifest_created_at(b"not json"), 0);
    }
}
