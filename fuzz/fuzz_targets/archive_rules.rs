//! The archive rules (`flotte_agent::image::unpack::rules`): entry names,
//! symlink targets, entry types and setuid bits, on any bytes. Beyond "no
//! panic", each accepted answer is checked against what the rule promises:
//! a normalised name is relative with plain components only, and an accepted
//! link target, resolved lexically from the link's directory, stays inside
//! the image root.
#![no_main]

use std::path::{Component, Path};

use flotte_agent::image::unpack::rules::{
    check_symlink_target, classify_entry_type, normalize_archive_path, setuid_refused,
    AcceptedEntryKind,
};
use libfuzzer_sys::fuzz_target;

/// How deep below the root `link` resolves `target` to, lexically; `None`
/// when it climbs above the root.
fn resolved_depth(link: &Path, target: &[u8]) -> Option<usize> {
    let mut depth = link.components().count().checked_sub(1)?;
    for component in target.split(|byte| *byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => depth = depth.checked_sub(1)?,
            _ => depth += 1,
        }
    }
    Some(depth)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let kind = classify_entry_type(tar::EntryType::new(selector));
    if let Ok(kind) = kind {
        let mode = u32::from(selector) << 4;
        let refused = setuid_refused(kind, mode, false);
        assert_eq!(
            refused,
            matches!(
                kind,
                AcceptedEntryKind::RegularFile | AcceptedEntryKind::Directory
            ) && mode & 0o6000 != 0
        );
        assert!(!setuid_refused(kind, mode, true));
    }
    // The name and the link target are split at the first NUL-free
    // separator byte 0xff (never in a valid UTF-8 name, still a valid byte).
    let (name, target) = match rest.iter().position(|byte| *byte == 0xff) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &b"target"[..]),
    };
    let Ok(Some(normalized)) = normalize_archive_path(name) else {
        return;
    };
    assert!(normalized.is_relative(), "{normalized:?}");
    assert!(
        normalized
            .components()
            .all(|component| matches!(component, Component::Normal(_))),
        "{normalized:?}"
    );
    if check_symlink_target(&normalized, target).is_ok() {
        assert!(
            resolved_depth(&normalized, target).is_some(),
            "{normalized:?} -> {:?} climbs above the root",
            String::from_utf8_lossy(target)
        );
        assert!(!target.starts_with(b"/") && !target.contains(&0));
    }
});
