//! The pure rules of what an image archive may hold: which entry types,
//! how entry names are normalised, which symlink targets stay inside the
//! image, when setuid/setgid bits are refused. No I/O here: every decision
//! is a function of the bytes of the archive (and the agent's policy), so
//! it can be table-tested and fuzzed on its own. The writer applies them.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

pub const PERMISSION_BITS: u32 = 0o7777;
pub const SETUID_SETGID_BITS: u32 = 0o6000;

/// The entry types an image may contain, plus the PAX global header, which
/// carries only archive-wide metadata and is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptedEntryKind {
    RegularFile,
    Directory,
    Symlink,
    HardLink,
    PaxGlobalHeader,
}

/// Classifies an entry type, or returns a description of the refused type.
/// GNU long names and per-entry PAX headers never get here in a ustar/GNU
/// archive: the tar reader folds them into the entry they describe.
pub fn classify_entry_type(entry_type: tar::EntryType) -> Result<AcceptedEntryKind, String> {
    match entry_type {
        // Contiguous files are regular files to every extractor.
        tar::EntryType::Regular | tar::EntryType::Continuous => Ok(AcceptedEntryKind::RegularFile),
        tar::EntryType::Directory => Ok(AcceptedEntryKind::Directory),
        tar::EntryType::Symlink => Ok(AcceptedEntryKind::Symlink),
        tar::EntryType::Link => Ok(AcceptedEntryKind::HardLink),
        tar::EntryType::XGlobalHeader => Ok(AcceptedEntryKind::PaxGlobalHeader),
        tar::EntryType::Char => Err("character device".to_owned()),
        tar::EntryType::Block => Err("block device".to_owned()),
        tar::EntryType::Fifo => Err("FIFO".to_owned()),
        tar::EntryType::GNUSparse => Err("GNU sparse file".to_owned()),
        tar::EntryType::GNULongName | tar::EntryType::GNULongLink | tar::EntryType::XHeader => {
            Err("name/PAX extension header in a pre-POSIX (v7) archive".to_owned())
        }
        other => Err(format!(
            "entry of unknown type {:?}",
            char::from(other.as_byte())
        )),
    }
}

/// Normalizes an archive path (an entry name or a hard-link target, both
/// relative to the image root): `.` components and empty components (from
/// `//` or a trailing `/`) are dropped. Returns `None` when the path names
/// the root itself, or why it is refused.
pub fn normalize_archive_path(raw_path: &[u8]) -> Result<Option<PathBuf>, String> {
    if raw_path.is_empty() {
        return Err("the name is empty".to_owned());
    }
    if raw_path.contains(&0) {
        return Err("the name contains a NUL byte".to_owned());
    }
    if raw_path.starts_with(b"/") {
        return Err("absolute paths are refused".to_owned());
    }
    let mut normalized = PathBuf::new();
    for component in raw_path.split(|byte| *byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err("`..` components are refused".to_owned()),
            name => normalized.push(OsStr::from_bytes(name)),
        }
    }
    if normalized.as_os_str().is_empty() {
        Ok(None)
    } else {
        Ok(Some(normalized))
    }
}

/// Checks a symlink target against the rule in the module documentation:
/// relative, leading `..` only, never climbing above the image root.
/// `link_relative` is the link's normalized path inside the root.
pub fn check_symlink_target(link_relative: &Path, target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("the target is empty".to_owned());
    }
    if target.contains(&0) {
        return Err("the target contains a NUL byte".to_owned());
    }
    if target.starts_with(b"/") {
        return Err(
            "absolute targets are refused: they would resolve against the machine's root, \
             not the image's"
                .to_owned(),
        );
    }
    let link_depth_below_root = link_relative.components().count().saturating_sub(1);
    let mut parent_steps = 0usize;
    let mut seen_named_component = false;
    for component in target.split(|byte| *byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." if seen_named_component => {
                return Err(
                    "`..` after a named component is refused: that name could be another \
                     symlink, so where `..` leads cannot be checked"
                        .to_owned(),
                );
            }
            b".." => {
                parent_steps += 1;
                if parent_steps > link_depth_below_root {
                    return Err(format!(
                        "{parent_steps} leading `..` climb above the image root from a link \
                         at depth {link_depth_below_root}"
                    ));
                }
            }
            _ => seen_named_component = true,
        }
    }
    Ok(())
}

pub fn path_from_archive_bytes(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes.to_vec()))
}

/// Whether an entry's setuid/setgid bits refuse it: they count where the
/// archive's mode is applied (files and directories; a link has none of its
/// own) and unless the agent config allows them.
pub fn setuid_refused(kind: AcceptedEntryKind, permission_bits: u32, allow_setuid: bool) -> bool {
    let mode_is_applied = matches!(
        kind,
        AcceptedEntryKind::RegularFile | AcceptedEntryKind::Directory
    );
    mode_is_applied && permission_bits & SETUID_SETGID_BITS != 0 && !allow_setuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use tar::EntryType;

    #[test]
    fn classifies_entry_types() {
        for accepted in [EntryType::Regular, EntryType::Continuous] {
            assert_eq!(
                classify_entry_type(accepted),
                Ok(AcceptedEntryKind::RegularFile)
            );
        }
        assert_eq!(
            classify_entry_type(EntryType::Link),
            Ok(AcceptedEntryKind::HardLink)
        );
        for (refused, kind) in [
            (EntryType::Char, "character device"),
            (EntryType::Block, "block device"),
            (EntryType::Fifo, "FIFO"),
            (EntryType::GNUSparse, "GNU sparse file"),
        ] {
            assert_eq!(classify_entry_type(refused), Err(kind.to_owned()));
        }
        let unknown = classify_entry_type(EntryType::new(b'Z')).unwrap_err();
        assert!(unknown.contains("unknown type 'Z'"), "{unknown}");
    }

    #[test]
    fn setuid_is_refused_only_where_a_mode_is_applied_and_not_allowed() {
        use AcceptedEntryKind::{Directory, HardLink, RegularFile, Symlink};
        assert!(setuid_refused(RegularFile, 0o4755, false));
        assert!(setuid_refused(Directory, 0o2775, false));
        assert!(!setuid_refused(RegularFile, 0o4755, true));
        assert!(!setuid_refused(RegularFile, 0o0755, false));
        assert!(!setuid_refused(Symlink, 0o6777, false));
        assert!(!setuid_refused(HardLink, 0o6777, false));
    }

    #[test]
    fn normalizes_archive_paths() {
        let normalized = |raw: &str| normalize_archive_path(raw.as_bytes());
        assert_eq!(
            normalized("./a//b/./c/").unwrap(),
            Some(PathBuf::from("a/b/c"))
        );
        assert_eq!(normalized("./").unwrap(), None);
        assert_eq!(normalized(".").unwrap(), None);
        assert!(normalized("").is_err());
        assert!(normalized("/etc/passwd").is_err());
        assert!(normalized("a/../b").is_err());
        assert!(normalized("..").is_err());
        assert!(normalize_archive_path(b"a\0b").is_err());
        assert_eq!(normalized("...").unwrap(), Some(PathBuf::from("...")));
    }

    #[test]
    fn checks_symlink_targets_lexically() {
        let check =
            |link: &str, target: &str| check_symlink_target(Path::new(link), target.as_bytes());
        assert!(check("a", "b").is_ok());
        assert!(check("a", ".").is_ok());
        assert!(check("a/b/link", "../../c/d").is_ok());
        assert!(check("a/b/link", "../..").is_ok());
        assert!(check("a/b/link", "../../..").is_err());
        assert!(check("link", "..").is_err());
        assert!(check("a/link", "b/../..").is_err());
        assert!(check("a/b/link", "c/../d").is_err());
        assert!(check("link", "/etc").is_err());
        assert!(check("link", "").is_err());
    }
}
