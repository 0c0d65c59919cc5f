//! The archive rules as the agent applies them: a tar archive built from
//! fuzzed entries (any type byte, raw name and link bytes, mode, data; the
//! header checksum made right so that the entries reach the rules) is
//! compressed and unpacked into a scratch directory with
//! `flotte_agent::image::unpack::unpack_payload`. Whatever it holds, nothing
//! may appear outside the image root, and a tree that was accepted holds
//! only directories, regular files without setuid/setgid bits, and symlinks
//! whose targets stay inside it; a refused one leaves nothing behind.
#![no_main]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use flotte_agent::image::unpack::{unpack_payload, UnpackPolicy};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Entry {
    kind: u8,
    name: Vec<u8>,
    link: Vec<u8>,
    mode: u16,
    data: Vec<u8>,
}

const MAX_ENTRIES: usize = 16;
const MAX_DATA: usize = 4096;

fn archive_of(entries: &[Entry]) -> Option<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries.iter().take(MAX_ENTRIES) {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::new(entry.kind));
        let raw = header.as_old_mut();
        let name = &entry.name[..entry.name.len().min(raw.name.len())];
        raw.name[..name.len()].copy_from_slice(name);
        let link = &entry.link[..entry.link.len().min(raw.linkname.len())];
        raw.linkname[..link.len()].copy_from_slice(link);
        header.set_mode(u32::from(entry.mode));
        let data = &entry.data[..entry.data.len().min(MAX_DATA)];
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, data).ok()?;
    }
    builder.into_inner().ok()
}

/// How deep below the root a link at `depth` resolves `target` to,
/// lexically; `None` when it climbs above the root or is absolute.
fn stays_inside(depth: usize, target: &[u8]) -> bool {
    if target.starts_with(b"/") {
        return false;
    }
    let mut depth = depth;
    for component in target.split(|byte| *byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => match depth.checked_sub(1) {
                Some(up) => depth = up,
                None => return false,
            },
            _ => depth += 1,
        }
    }
    true
}

/// Checks every entry under `directory` (at `depth` below the image root);
/// counts the names of each regular file's inode in `names_of_inode`.
fn check_tree(directory: &Path, depth: usize, names_of_inode: &mut HashMap<u64, (u64, u64)>) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let entries = std::fs::read_dir(directory).expect("read the unpacked tree");
    for entry in entries {
        let entry = entry.expect("read an unpacked entry");
        let metadata = std::fs::symlink_metadata(entry.path()).expect("stat an unpacked entry");
        let kind = metadata.file_type();
        if kind.is_symlink() {
            let target = std::fs::read_link(entry.path()).expect("read a link");
            assert!(
                stays_inside(depth, target.as_os_str().as_bytes()),
                "{:?} -> {target:?} leaves the image",
                entry.path()
            );
        } else if kind.is_dir() {
            check_tree(&entry.path(), depth + 1, names_of_inode);
        } else {
            assert!(kind.is_file(), "{:?} is {kind:?}", entry.path());
            assert_eq!(
                metadata.permissions().mode() & 0o6000,
                0,
                "{:?}",
                entry.path()
            );
            names_of_inode
                .entry(metadata.ino())
                .or_insert((metadata.nlink(), 0))
                .1 += 1;
        }
    }
}

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("flotte-fuzz-unpack-{}", std::process::id()))
}

fuzz_target!(|entries: Vec<Entry>| {
    let Some(tar) = archive_of(&entries) else {
        return;
    };
    let Ok(compressed) = zstd::encode_all(tar.as_slice(), 1) else {
        return;
    };
    let scratch = scratch();
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("images")).expect("scratch");
    let payload = scratch.join("payload.tar.zst");
    std::fs::write(&payload, compressed).expect("write the payload");
    let image = scratch.join("images").join("image");
    let policy = UnpackPolicy {
        max_total_bytes: 1 << 20,
        allow_setuid: false,
    };
    let unpacked = unpack_payload(&payload, &image, &policy);
    // Nothing beside the image root, accepted or not.
    let beside: Vec<_> = std::fs::read_dir(scratch.join("images"))
        .expect("list images")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    match unpacked {
        Ok(_) => {
            assert_eq!(beside, ["image"], "{beside:?}");
            // Every name of every file is inside the tree: a hard link never
            // reaches a file outside it.
            let mut names_of_inode = HashMap::new();
            check_tree(&image, 0, &mut names_of_inode);
            for (inode, (links, names)) in names_of_inode {
                assert_eq!(links, names, "inode {inode} has names outside the image");
            }
        }
        Err(_) => assert!(beside.is_empty(), "a refused payload left {beside:?}"),
    }
    let listed: Vec<_> = std::fs::read_dir(&scratch)
        .expect("list scratch")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    std::fs::remove_dir_all(&scratch).expect("clean the scratch directory");
});
