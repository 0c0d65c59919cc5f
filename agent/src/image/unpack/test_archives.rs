//! Test support for the unpack tests: a scratch directory with a sentinel
//! that attacks aim at, archives built from raw headers (so that names the
//! `tar` builder refuses can be written), and the assertion that a refusal
//! left nothing behind and changed nothing.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::{remove_unpacked_tree, unpack_payload, UnpackError, UnpackPolicy};

pub(super) fn default_policy() -> UnpackPolicy {
    UnpackPolicy {
        max_total_bytes: 1024 * 1024,
        allow_setuid: false,
    }
}

/// A scratch directory holding the payload, `images/` (where the
/// destination goes) and a sentinel directory next to it that attacks
/// aim at. Removed on drop.
pub(super) struct Scratch {
    pub(super) root: PathBuf,
}

impl Scratch {
    pub(super) fn new() -> Self {
        let root = std::env::temp_dir().join(format!("flotte-unpack-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(root.join("images")).unwrap();
        fs::create_dir_all(root.join("sentinel")).unwrap();
        fs::write(root.join("sentinel/keep.txt"), b"untouched").unwrap();
        Self { root }
    }

    pub(super) fn destination(&self) -> PathBuf {
        self.root.join("images/dest")
    }

    pub(super) fn archive_path(&self) -> PathBuf {
        self.root.join("payload.tar.zst")
    }

    pub(super) fn sentinel(&self) -> PathBuf {
        self.root.join("sentinel")
    }

    /// Everything under the scratch root: path -> what it is.
    pub(super) fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut snapshot = BTreeMap::new();
        let mut pending = vec![self.root.clone()];
        while let Some(path) = pending.pop() {
            let metadata = fs::symlink_metadata(&path).unwrap();
            let relative = path.strip_prefix(&self.root).unwrap().to_path_buf();
            let description = if metadata.file_type().is_symlink() {
                format!("symlink -> {}", fs::read_link(&path).unwrap().display())
            } else if metadata.is_dir() {
                for child in fs::read_dir(&path).unwrap() {
                    pending.push(child.unwrap().path());
                }
                format!("dir {:o}", metadata.mode() & 0o7777)
            } else {
                format!("file {:?}", fs::read(&path).unwrap())
            };
            snapshot.insert(relative, description);
        }
        snapshot
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = remove_unpacked_tree(&self.root);
    }
}

/// Builds archives entry by entry from raw headers, so that names the
/// `tar` builder refuses (`..`, absolute) can be written.
pub(super) struct TestArchive {
    pub(super) builder: tar::Builder<Vec<u8>>,
}

impl TestArchive {
    pub(super) fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    pub(super) fn entry(
        mut self,
        name: &[u8],
        entry_type: EntryType,
        mode: u32,
        link_name: Option<&[u8]>,
        data: &[u8],
    ) -> Self {
        let mut header = Header::new_gnu();
        let name_field = &mut header.as_old_mut().name;
        assert!(name.len() <= name_field.len(), "use a GNU long name");
        name_field[..name.len()].copy_from_slice(name);
        header.set_entry_type(entry_type);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        // Ownership that must not be applied.
        header.set_uid(4242);
        header.set_gid(4242);
        header.set_mtime(0);
        if let Some(link_name) = link_name {
            header.set_link_name_literal(link_name).unwrap();
        }
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    pub(super) fn file(self, name: &str, mode: u32, data: &[u8]) -> Self {
        self.entry(name.as_bytes(), EntryType::Regular, mode, None, data)
    }

    pub(super) fn directory(self, name: &str, mode: u32) -> Self {
        self.entry(name.as_bytes(), EntryType::Directory, mode, None, b"")
    }

    pub(super) fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(
            name.as_bytes(),
            EntryType::Symlink,
            0o777,
            Some(target.as_bytes()),
            b"",
        )
    }

    pub(super) fn hard_link(self, name: &str, target: &str) -> Self {
        self.entry(
            name.as_bytes(),
            EntryType::Link,
            0o644,
            Some(target.as_bytes()),
            b"",
        )
    }

    /// A GNU long-name header: the next entry is named `long_name`.
    pub(super) fn gnu_long_name(self, long_name: &[u8]) -> Self {
        let mut data = long_name.to_vec();
        data.push(0);
        self.entry(b"././@LongLink", EntryType::GNULongName, 0o644, None, &data)
    }

    /// A PAX header: the next entry is named `path`.
    pub(super) fn pax_path(self, path: &[u8]) -> Self {
        let data = pax_record("path", path);
        self.entry(b"PaxHeaders/next", EntryType::XHeader, 0o644, None, &data)
    }

    pub(super) fn tar_bytes(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }

    pub(super) fn compressed(self) -> Vec<u8> {
        zstd::encode_all(&self.tar_bytes()[..], 3).unwrap()
    }
}

/// One PAX record: "<length> <key>=<value>\n", the length counting
/// itself.
pub(super) fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body_length = 1 + key.len() + 1 + value.len() + 1;
    let mut total_length = body_length + 1;
    while total_length.to_string().len() + body_length != total_length {
        total_length = total_length.to_string().len() + body_length;
    }
    let mut record = format!("{total_length} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    assert_eq!(record.len(), total_length);
    record
}

/// Unpacks `payload` in a fresh scratch directory and asserts a clean
/// refusal: an error, no destination, nothing else changed.
pub(super) fn assert_refused_bytes(payload: &[u8], policy: &UnpackPolicy) -> UnpackError {
    let scratch = Scratch::new();
    assert_refused_in(&scratch, payload, policy)
}

pub(super) fn assert_refused_in(
    scratch: &Scratch,
    payload: &[u8],
    policy: &UnpackPolicy,
) -> UnpackError {
    fs::write(scratch.archive_path(), payload).unwrap();
    let before = scratch.snapshot();
    let result = unpack_payload(&scratch.archive_path(), &scratch.destination(), policy);
    let error = match result {
        Ok(summary) => panic!("expected a refusal, got {summary:?}"),
        Err(error) => error,
    };
    assert!(
        fs::symlink_metadata(scratch.destination()).is_err(),
        "the partial unpack must be removed ({error})"
    );
    assert_eq!(
        scratch.snapshot(),
        before,
        "nothing outside may change ({error})"
    );
    error
}

pub(super) fn assert_refused(archive: TestArchive) -> UnpackError {
    assert_refused_bytes(&archive.compressed(), &default_policy())
}

pub(super) fn assert_names_entry(error: &UnpackError, entry_name: &str) {
    assert!(
        error.to_string().contains(&format!("`{entry_name}`")),
        "error should name `{entry_name}`: {error}"
    );
}

pub(super) fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}
