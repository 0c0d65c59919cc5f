//! Writing the tree of one payload into its fresh image root: each entry
//! is checked against the rules, then created exclusively (`O_EXCL`,
//! `symlink(2)`, `link(2)`) below parents that are real directories, never
//! through a link; modes are applied exactly (restrictive directory modes
//! last, deepest first) and ownership never. A refused payload's partial
//! tree is removed without following links.

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::budget::{stream_error, BudgetedReader, DataBudget, StreamBudget};
use super::rules::{
    check_symlink_target, classify_entry_type, normalize_archive_path, path_from_archive_bytes,
    setuid_refused, AcceptedEntryKind, PERMISSION_BITS,
};
use super::{io_error_at, UnpackError, UnpackPolicy, UnpackSummary};

/// Mode of the image root and of parent directories the archive implies
/// without listing them.
const UNPACKED_DIRECTORY_MODE: u32 = 0o755;

/// Owner read/write/search: kept on every directory while unpacking so that
/// a read-only directory of the archive can still receive its children.
const OWNER_READ_WRITE_SEARCH: u32 = 0o700;

/// Mode of a regular file while its data is written; the archive's mode is
/// applied once the data is complete (writing would clear setuid anyway).
const MODE_WHILE_WRITING_FILE: u32 = 0o600;

const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// Removes an unpacked (or partially unpacked) image tree without following
/// symlinks. Unlike a bare `remove_dir_all`, it first makes every directory
/// owner-writable, so that read-only directories of the image (mode 0555)
/// do not make the removal fail for an unprivileged agent.
pub fn remove_unpacked_tree(root: &Path) -> io::Result<()> {
    let mut pending_directories = vec![root.to_path_buf()];
    while let Some(directory) = pending_directories.pop() {
        let Ok(metadata) = fs::symlink_metadata(&directory) else {
            continue;
        };
        if !metadata.is_dir() {
            continue;
        }
        let mode = metadata.permissions().mode();
        if mode & OWNER_READ_WRITE_SEARCH != OWNER_READ_WRITE_SEARCH {
            let writable_mode = (mode & PERMISSION_BITS) | OWNER_READ_WRITE_SEARCH;
            // A failure here shows up as the removal's own error below.
            let _ = fs::set_permissions(&directory, Permissions::from_mode(writable_mode));
        }
        let Ok(children) = fs::read_dir(&directory) else {
            continue;
        };
        for child in children.flatten() {
            if child.file_type().is_ok_and(|file_type| file_type.is_dir()) {
                pending_directories.push(child.path());
            }
        }
    }
    fs::remove_dir_all(root)
}

/// Creates `destination` atomically: `create_dir` fails if anything (even a
/// dangling symlink) is already there, so an existing image is never reused.
pub(super) fn create_image_root(destination: &Path) -> Result<(), UnpackError> {
    if let Some(parent) = destination
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        fs::create_dir_all(parent).map_err(io_error_at(parent))?;
    }
    match create_directory_with_mode(destination, UNPACKED_DIRECTORY_MODE) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            Err(UnpackError::DestinationExists {
                path: destination.to_path_buf(),
            })
        }
        Err(error) => Err(io_error_at(destination)(error)),
    }
}

/// Creates one directory with exactly `mode` (the explicit chmod undoes the
/// umask). Fails if the path exists.
fn create_directory_with_mode(path: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().mode(mode).create(path)?;
    fs::set_permissions(path, Permissions::from_mode(mode))
}

/// Best-effort removal of a partial image after a refusal: the refusal is
/// what the caller needs to see, so a failed cleanup is only logged.
pub(super) fn remove_partial_image(image_root: &Path) {
    if let Err(error) = remove_unpacked_tree(image_root) {
        tracing::warn!(
            path = %image_root.display(),
            %error,
            "could not remove a partially unpacked image"
        );
    }
}

pub(super) fn unpack_into_fresh_root(
    archive_path: &Path,
    archive_file: File,
    image_root: &Path,
    policy: &UnpackPolicy,
) -> Result<UnpackSummary, UnpackError> {
    let decompressed = zstd::stream::read::Decoder::with_buffer(BufReader::new(archive_file))
        .map_err(io_error_at(archive_path))?;
    let stream_budget = Rc::new(StreamBudget::default());
    let mut archive = tar::Archive::new(BudgetedReader {
        inner: decompressed,
        budget: Rc::clone(&stream_budget),
    });
    let mut unpacker = ImageUnpacker {
        image_root: image_root.to_path_buf(),
        policy,
        summary: UnpackSummary {
            files: 0,
            directories: 0,
            symlinks: 0,
            total_bytes: 0,
        },
        data_budget: DataBudget::new(policy.max_total_bytes),
        restrictive_directory_modes: HashMap::new(),
        copy_buffer: vec![0; COPY_BUFFER_BYTES],
        stream_budget,
        last_entry: None,
    };
    unpacker.unpack_all_entries(&mut archive)?;
    unpacker.apply_restrictive_directory_modes()?;
    Ok(unpacker.summary)
}

struct ImageUnpacker<'policy> {
    image_root: PathBuf,
    policy: &'policy UnpackPolicy,
    summary: UnpackSummary,
    /// Declared data sizes of all entries so far, checked against the policy
    /// before an entry is written.
    data_budget: DataBudget,
    /// Directories whose archive mode lacks owner `rwx`, applied at the end.
    restrictive_directory_modes: HashMap<PathBuf, u32>,
    copy_buffer: Vec<u8>,
    stream_budget: Rc<StreamBudget>,
    /// The last entry read, named by errors that happen between entries.
    last_entry: Option<PathBuf>,
}

impl ImageUnpacker<'_> {
    fn unpack_all_entries<R: Read>(
        &mut self,
        archive: &mut tar::Archive<R>,
    ) -> Result<(), UnpackError> {
        let mut entries = archive
            .entries()
            .map_err(|source| stream_error(&self.stream_budget, None, source))?;
        loop {
            self.stream_budget.begin_headers();
            let next_entry = entries.next();
            self.stream_budget.begin_entry_data();
            let mut entry = match next_entry {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(source)) => {
                    return Err(stream_error(
                        &self.stream_budget,
                        self.last_entry.as_deref(),
                        source,
                    ));
                }
            };
            let entry_name = path_from_archive_bytes(&entry.path_bytes());
            self.last_entry = Some(entry_name.clone());
            self.unpack_entry(&mut entry, &entry_name)?;
        }
        if !self.stream_budget.read_end_of_archive_block() {
            return Err(UnpackError::Corrupt {
                near_entry: self.last_entry.clone(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the archive ends without the tar end-of-archive block",
                ),
            });
        }
        Ok(())
    }

    /// Validates one entry completely (type, path, mode, size, link target,
    /// parents) before creating it.
    fn unpack_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        entry_name: &Path,
    ) -> Result<(), UnpackError> {
        let kind = classify_entry_type(entry.header().entry_type()).map_err(|kind| {
            UnpackError::ForbiddenType {
                entry: entry_name.to_path_buf(),
                kind,
            }
        })?;
        if kind == AcceptedEntryKind::PaxGlobalHeader {
            // Its data is skipped by the tar reader, as bounded metadata.
            return Ok(());
        }
        let relative_path =
            normalize_archive_path(entry_name.as_os_str().as_bytes()).map_err(|reason| {
                UnpackError::UnsafePath {
                    entry: entry_name.to_path_buf(),
                    reason,
                }
            })?;
        let permission_bits = entry
            .header()
            .mode()
            .map_err(|source| UnpackError::Corrupt {
                near_entry: Some(entry_name.to_path_buf()),
                source,
            })?
            & PERMISSION_BITS;
        if setuid_refused(kind, permission_bits, self.policy.allow_setuid) {
            return Err(UnpackError::Setuid {
                entry: entry_name.to_path_buf(),
                mode: permission_bits,
            });
        }
        let declared_size = entry.size();
        if !self.data_budget.charge(declared_size) {
            return Err(UnpackError::TooLarge {
                entry: entry_name.to_path_buf(),
                limit: self.policy.max_total_bytes,
            });
        }

        match (kind, relative_path) {
            // `./` itself: the root exists already and keeps its own mode.
            (AcceptedEntryKind::Directory, None) => {}
            (_, None) => {
                return Err(UnpackError::UnsafePath {
                    entry: entry_name.to_path_buf(),
                    reason: "it names the image root itself but is not a directory".to_owned(),
                });
            }
            (AcceptedEntryKind::RegularFile, Some(relative_path)) => {
                // Only v7 archives mark directories this way; writing a file
                // at `name/` would fail anyway, so say why.
                if entry_name.as_os_str().as_bytes().ends_with(b"/") {
                    return Err(UnpackError::UnsafePath {
                        entry: entry_name.to_path_buf(),
                        reason: "a regular file whose name ends with `/`".to_owned(),
                    });
                }
                return self.unpack_regular_file(
                    entry,
                    entry_name,
                    &relative_path,
                    declared_size,
                    permission_bits,
                );
            }
            (AcceptedEntryKind::Directory, Some(relative_path)) => {
                self.unpack_directory(entry_name, &relative_path, permission_bits)?;
            }
            (AcceptedEntryKind::Symlink, Some(relative_path)) => {
                let target = entry
                    .link_name_bytes()
                    .map(|bytes| path_from_archive_bytes(&bytes))
                    .unwrap_or_default();
                self.unpack_symlink(entry_name, &relative_path, &target)?;
            }
            (AcceptedEntryKind::HardLink, Some(relative_path)) => {
                let target = entry
                    .link_name_bytes()
                    .map(|bytes| path_from_archive_bytes(&bytes))
                    .unwrap_or_default();
                self.unpack_hard_link(entry_name, &relative_path, &target)?;
            }
            (AcceptedEntryKind::PaxGlobalHeader, Some(_)) => {}
        }
        // Entries other than files normally carry no data; whatever they
        // declare was counted above and is read (and dropped) here so the
        // tar reader does not skip it as unbounded "metadata".
        if declared_size > 0 {
            self.copy_entry_data(
                entry,
                &mut io::sink(),
                entry_name,
                entry_name,
                declared_size,
            )?;
        }
        Ok(())
    }

    fn unpack_regular_file<R: Read>(
        &mut self,
        entry: &mut R,
        entry_name: &Path,
        relative_path: &Path,
        declared_size: u64,
        permission_bits: u32,
    ) -> Result<(), UnpackError> {
        self.create_parent_directories(entry_name, relative_path)?;
        let file_path = self.image_root.join(relative_path);
        self.ensure_path_is_free(entry_name, &file_path)?;
        // `create_new` is O_CREAT | O_EXCL: it never opens an existing file
        // and refuses a symlink in the final component, even a dangling one.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(MODE_WHILE_WRITING_FILE)
            .open(&file_path)
            .map_err(io_error_at(&file_path))?;
        let bytes_written =
            self.copy_entry_data(entry, &mut file, &file_path, entry_name, declared_size)?;
        self.summary.total_bytes = self.summary.total_bytes.saturating_add(bytes_written);
        // fchmod on the open file: exact bits, no umask, no path lookup.
        file.set_permissions(Permissions::from_mode(permission_bits))
            .map_err(io_error_at(&file_path))?;
        self.summary.files += 1;
        Ok(())
    }

    fn unpack_directory(
        &mut self,
        entry_name: &Path,
        relative_path: &Path,
        permission_bits: u32,
    ) -> Result<(), UnpackError> {
        self.create_parent_directories(entry_name, relative_path)?;
        let directory_path = self.image_root.join(relative_path);
        let mode_while_unpacking = permission_bits | OWNER_READ_WRITE_SEARCH;
        match fs::symlink_metadata(&directory_path) {
            // Listed again, or implied earlier by a deeper entry.
            Ok(metadata) if metadata.is_dir() => {
                fs::set_permissions(
                    &directory_path,
                    Permissions::from_mode(mode_while_unpacking),
                )
                .map_err(io_error_at(&directory_path))?;
            }
            Ok(_) => {
                return Err(UnpackError::UnsafePath {
                    entry: entry_name.to_path_buf(),
                    reason: "a previous entry created this path as something other than a \
                             directory"
                        .to_owned(),
                });
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                create_directory_with_mode(&directory_path, mode_while_unpacking)
                    .map_err(io_error_at(&directory_path))?;
                self.summary.directories += 1;
            }
            Err(error) => return Err(io_error_at(&directory_path)(error)),
        }
        if permission_bits == mode_while_unpacking {
            self.restrictive_directory_modes.remove(relative_path);
        } else {
            self.restrictive_directory_modes
                .insert(relative_path.to_path_buf(), permission_bits);
        }
        Ok(())
    }

    fn unpack_symlink(
        &mut self,
        entry_name: &Path,
        relative_path: &Path,
        target: &Path,
    ) -> Result<(), UnpackError> {
        check_symlink_target(relative_path, target.as_os_str().as_bytes()).map_err(|reason| {
            UnpackError::SymlinkEscape {
                entry: entry_name.to_path_buf(),
                target: target.to_path_buf(),
                reason,
            }
        })?;
        self.create_parent_directories(entry_name, relative_path)?;
        let link_path = self.image_root.join(relative_path);
        self.ensure_path_is_free(entry_name, &link_path)?;
        // symlink(2) fails if the path exists; it never follows anything.
        std::os::unix::fs::symlink(target, &link_path).map_err(io_error_at(&link_path))?;
        self.summary.symlinks += 1;
        Ok(())
    }

    fn unpack_hard_link(
        &mut self,
        entry_name: &Path,
        relative_path: &Path,
        target: &Path,
    ) -> Result<(), UnpackError> {
        let refuse = |reason: String| UnpackError::HardlinkEscape {
            entry: entry_name.to_path_buf(),
            target: target.to_path_buf(),
            reason,
        };
        let target_relative = match normalize_archive_path(target.as_os_str().as_bytes()) {
            Ok(Some(target_relative)) => target_relative,
            Ok(None) => return Err(refuse("the target is the image root".to_owned())),
            Err(reason) => return Err(refuse(format!("bad target: {reason}"))),
        };
        self.check_hard_link_target(&target_relative)
            .map_err(|reason| match reason {
                HardLinkTargetProblem::Refused(reason) => refuse(reason),
                HardLinkTargetProblem::Io(path, source) => UnpackError::Io { path, source },
            })?;
        self.create_parent_directories(entry_name, relative_path)?;
        let link_path = self.image_root.join(relative_path);
        self.ensure_path_is_free(entry_name, &link_path)?;
        // link(2) does not follow a symlink at the source; the source was
        // just checked to be a regular file reached through directories.
        fs::hard_link(self.image_root.join(&target_relative), &link_path)
            .map_err(io_error_at(&link_path))?;
        self.summary.files += 1;
        Ok(())
    }

    /// A hard link may only point at a regular file unpacked earlier, reached
    /// through real directories: that file is then inside the root, and it
    /// was created by this unpack.
    fn check_hard_link_target(&self, target_relative: &Path) -> Result<(), HardLinkTargetProblem> {
        let mut current_path = self.image_root.clone();
        let component_count = target_relative.components().count();
        for (index, component) in target_relative.components().enumerate() {
            current_path.push(component);
            let is_last = index + 1 == component_count;
            let metadata = match fs::symlink_metadata(&current_path) {
                Ok(metadata) => metadata,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    return Err(HardLinkTargetProblem::Refused(
                        "the target does not exist: hard links must point to a file unpacked \
                         earlier in the archive"
                            .to_owned(),
                    ));
                }
                Err(error) => return Err(HardLinkTargetProblem::Io(current_path, error)),
            };
            let file_type = metadata.file_type();
            if file_type.is_symlink() {
                return Err(HardLinkTargetProblem::Refused(
                    "the target is reached through a symlink".to_owned(),
                ));
            }
            if is_last && !file_type.is_file() {
                return Err(HardLinkTargetProblem::Refused(
                    "the target is not a regular file".to_owned(),
                ));
            }
            if !is_last && !file_type.is_dir() {
                return Err(HardLinkTargetProblem::Refused(
                    "a parent of the target is not a directory".to_owned(),
                ));
            }
        }
        Ok(())
    }

    /// Creates the missing parents of an entry, refusing any existing parent
    /// that is not a real directory. This is the tar-slip guard: after
    /// `a -> /etc`, the entry `a/passwd` is refused here, never written
    /// through the link (links inside the image are refused as parents too).
    fn create_parent_directories(
        &mut self,
        entry_name: &Path,
        relative_path: &Path,
    ) -> Result<(), UnpackError> {
        let Some(relative_parent) = relative_path.parent() else {
            return Ok(());
        };
        let mut current_path = self.image_root.clone();
        let mut current_relative = PathBuf::new();
        for component in relative_parent.components() {
            current_path.push(component);
            current_relative.push(component);
            match fs::symlink_metadata(&current_path) {
                Ok(metadata) if metadata.file_type().is_symlink() => {
                    return Err(UnpackError::UnsafePath {
                        entry: entry_name.to_path_buf(),
                        reason: format!(
                            "its parent `{}` is a symlink; entries are never written through \
                             symlinks",
                            current_relative.display()
                        ),
                    });
                }
                Ok(metadata) if metadata.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::UnsafePath {
                        entry: entry_name.to_path_buf(),
                        reason: format!(
                            "its parent `{}` is not a directory",
                            current_relative.display()
                        ),
                    });
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    create_directory_with_mode(&current_path, UNPACKED_DIRECTORY_MODE)
                        .map_err(io_error_at(&current_path))?;
                    self.summary.directories += 1;
                }
                Err(error) => return Err(io_error_at(&current_path)(error)),
            }
        }
        Ok(())
    }

    /// Entries never replace each other (a later entry replacing a symlink or
    /// a hard link is how extractors get tricked into writing elsewhere).
    /// Creation is exclusive anyway; this gives the refusal a clear message.
    fn ensure_path_is_free(&self, entry_name: &Path, path: &Path) -> Result<(), UnpackError> {
        match fs::symlink_metadata(path) {
            Ok(_) => Err(UnpackError::UnsafePath {
                entry: entry_name.to_path_buf(),
                reason: "a previous entry already created this path; entries never replace \
                         each other"
                    .to_owned(),
            }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error_at(path)(error)),
        }
    }

    /// Copies an entry's data, requiring exactly `declared_size` bytes: fewer
    /// means a truncated archive, more (impossible through the tar reader,
    /// checked anyway) a header lying about its size. Read failures are
    /// stream errors naming the entry; write failures are I/O errors at
    /// `writer_path`.
    fn copy_entry_data<R: Read, W: Write>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        writer_path: &Path,
        entry_name: &Path,
        declared_size: u64,
    ) -> Result<u64, UnpackError> {
        let mut bytes_copied: u64 = 0;
        loop {
            let bytes_read = match reader.read(&mut self.copy_buffer) {
                Ok(0) => break,
                Ok(bytes_read) => bytes_read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(stream_error(&self.stream_budget, Some(entry_name), error));
                }
            };
            bytes_copied = bytes_copied.saturating_add(bytes_read as u64);
            if bytes_copied > declared_size {
                return Err(UnpackError::TooLarge {
                    entry: entry_name.to_path_buf(),
                    limit: self.policy.max_total_bytes,
                });
            }
            writer
                .write_all(&self.copy_buffer[..bytes_read])
                .map_err(io_error_at(writer_path))?;
        }
        if bytes_copied < declared_size {
            return Err(UnpackError::Corrupt {
                near_entry: Some(entry_name.to_path_buf()),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the entry's data ends after {bytes_copied} of {declared_size} bytes"),
                ),
            });
        }
        Ok(bytes_copied)
    }

    /// Applies the archive's modes that lack owner `rwx`, deepest first so
    /// that a parent losing search permission does not block its children.
    fn apply_restrictive_directory_modes(&mut self) -> Result<(), UnpackError> {
        let mut directories: Vec<(PathBuf, u32)> =
            self.restrictive_directory_modes.drain().collect();
        directories.sort_by_key(|(relative_path, _)| {
            std::cmp::Reverse(relative_path.components().count())
        });
        for (relative_path, mode) in directories {
            let directory_path = self.image_root.join(&relative_path);
            fs::set_permissions(&directory_path, Permissions::from_mode(mode))
                .map_err(io_error_at(&directory_path))?;
        }
        Ok(())
    }
}

enum HardLinkTargetProblem {
    Refused(String),
    Io(PathBuf, io::Error),
}

#[cfg(test)]
mod tests {
    use super::super::test_archives::*;
    use super::super::unpack_payload;
    use super::*;
    use tar::{EntryType, Header};

    #[test]
    fn refuses_parent_directory_escape() {
        let error = assert_refused(TestArchive::new().file("../evil", 0o644, b"x"));
        assert!(
            matches!(&error, UnpackError::UnsafePath { entry, .. } if entry == Path::new("../evil"))
        );
        assert_names_entry(&error, "../evil");
    }

    #[test]
    fn refuses_absolute_path() {
        let scratch = Scratch::new();
        let target = scratch.sentinel().join("pwned");
        let target_name = target.to_str().unwrap().to_owned();
        let archive = TestArchive::new().file(&target_name, 0o644, b"x");
        let error = assert_refused_in(&scratch, &archive.compressed(), &default_policy());
        assert!(matches!(&error, UnpackError::UnsafePath { entry, .. } if entry == &target));
        assert_names_entry(&error, &target_name);

        let error = assert_refused(TestArchive::new().file("/abs", 0o644, b"x"));
        assert_names_entry(&error, "/abs");
    }

    #[test]
    fn refuses_dot_dot_inside_a_path() {
        let error = assert_refused(TestArchive::new().directory("a/", 0o755).file(
            "a/../../evil",
            0o644,
            b"x",
        ));
        assert!(matches!(&error, UnpackError::UnsafePath { .. }));
        assert_names_entry(&error, "a/../../evil");
    }

    #[test]
    fn refuses_dot_dot_in_a_gnu_long_name_and_a_pax_path() {
        let long_escape = format!("{}/../../../evil", "a/".repeat(60));
        let error = assert_refused(
            TestArchive::new()
                .gnu_long_name(long_escape.as_bytes())
                .file("harmless", 0o644, b"x"),
        );
        assert!(matches!(&error, UnpackError::UnsafePath { .. }));
        assert_names_entry(&error, &long_escape);

        let error = assert_refused(
            TestArchive::new()
                .pax_path(b"../evil")
                .file("harmless", 0o644, b"x"),
        );
        assert!(
            matches!(&error, UnpackError::UnsafePath { entry, .. } if entry == Path::new("../evil"))
        );
    }

    #[test]
    fn refuses_symlink_escaping_the_root() {
        let error = assert_refused(
            TestArchive::new()
                .directory("dir/", 0o755)
                .symlink("dir/link", "../../etc"),
        );
        assert!(
            matches!(&error, UnpackError::SymlinkEscape { entry, target, .. }
                if entry == Path::new("dir/link") && target == Path::new("../../etc"))
        );
        assert_names_entry(&error, "dir/link");
    }

    #[test]
    fn refuses_absolute_symlink() {
        let error = assert_refused(TestArchive::new().symlink("etc-link", "/etc"));
        assert!(matches!(&error, UnpackError::SymlinkEscape { .. }));
        assert_names_entry(&error, "etc-link");
    }

    #[test]
    fn refuses_symlink_chains_that_would_escape_through_another_link() {
        // Lexically `d/e/l2 -> ../l1/..` stays inside, but `d/l1 -> ..` is
        // the root, so `l2` would point above it.
        let error = assert_refused(
            TestArchive::new()
                .directory("d/e/", 0o755)
                .symlink("d/l1", "..")
                .symlink("d/e/l2", "../l1/.."),
        );
        assert!(matches!(&error, UnpackError::SymlinkEscape { .. }));
        assert_names_entry(&error, "d/e/l2");
    }

    #[test]
    fn refuses_hard_link_outside_the_root() {
        let error = assert_refused(TestArchive::new().hard_link("link", "../outside"));
        assert!(
            matches!(&error, UnpackError::HardlinkEscape { entry, target, .. }
                if entry == Path::new("link") && target == Path::new("../outside"))
        );
        assert_names_entry(&error, "link");
    }

    #[test]
    fn refuses_hard_link_to_a_missing_entry() {
        let error = assert_refused(
            TestArchive::new()
                .file("present", 0o644, b"x")
                .hard_link("link", "missing"),
        );
        assert!(matches!(&error, UnpackError::HardlinkEscape { .. }));
        assert_names_entry(&error, "link");
    }

    #[test]
    fn refuses_hard_link_through_a_symlink_or_to_a_directory() {
        let error = assert_refused(
            TestArchive::new()
                .file("sub/file", 0o644, b"x")
                .symlink("alias", "sub")
                .hard_link("link", "alias/file"),
        );
        assert!(matches!(&error, UnpackError::HardlinkEscape { .. }));
        assert_names_entry(&error, "link");

        let error = assert_refused(
            TestArchive::new()
                .directory("sub/", 0o755)
                .hard_link("link", "sub"),
        );
        assert!(matches!(&error, UnpackError::HardlinkEscape { .. }));
    }

    #[test]
    fn refuses_writing_through_an_escaping_symlink() {
        // The classic tar slip: `dir -> <outside>` then `dir/file`. The link
        // itself is refused first, since it is absolute.
        let scratch = Scratch::new();
        let sentinel = scratch.sentinel();
        let archive = TestArchive::new()
            .symlink("dir", sentinel.to_str().unwrap())
            .file("dir/file", 0o644, b"pwned");
        let error = assert_refused_in(&scratch, &archive.compressed(), &default_policy());
        assert!(
            matches!(&error, UnpackError::SymlinkEscape { entry, .. } if entry == Path::new("dir"))
        );

        let error = assert_refused(TestArchive::new().symlink("dir", "../../sentinel").file(
            "dir/keep.txt",
            0o644,
            b"pwned",
        ));
        assert_names_entry(&error, "dir");
    }

    #[test]
    fn refuses_writing_through_a_symlink_inside_the_root() {
        let error = assert_refused(
            TestArchive::new()
                .directory("sub/", 0o755)
                .symlink("alias", "sub")
                .file("alias/file", 0o644, b"x"),
        );
        assert!(
            matches!(&error, UnpackError::UnsafePath { entry, .. } if entry == Path::new("alias/file"))
        );
        assert_names_entry(&error, "alias/file");

        let error = assert_refused(
            TestArchive::new()
                .directory("sub/", 0o755)
                .symlink("alias", "sub")
                .directory("alias/", 0o755),
        );
        assert_names_entry(&error, "alias/");
    }

    #[test]
    fn refuses_an_entry_replacing_an_earlier_one() {
        let error = assert_refused(
            TestArchive::new()
                .directory("sub/", 0o755)
                .symlink("alias", "sub")
                .file("alias", 0o644, b"x"),
        );
        assert!(
            matches!(&error, UnpackError::UnsafePath { entry, .. } if entry == Path::new("alias"))
        );

        let error = assert_refused(
            TestArchive::new()
                .file("twice", 0o644, b"x")
                .file("twice", 0o644, b"y"),
        );
        assert_names_entry(&error, "twice");
    }

    #[test]
    fn refuses_devices_and_fifos() {
        for (entry_type, kind) in [
            (EntryType::Char, "character device"),
            (EntryType::Block, "block device"),
            (EntryType::Fifo, "FIFO"),
        ] {
            let error = assert_refused(TestArchive::new().file("before", 0o644, b"x").entry(
                b"dev/node",
                entry_type,
                0o666,
                None,
                b"",
            ));
            assert!(
                matches!(&error, UnpackError::ForbiddenType { entry, kind: refused_kind }
                    if entry == Path::new("dev/node") && refused_kind == kind),
                "{error}"
            );
            assert_names_entry(&error, "dev/node");
        }
    }

    #[test]
    fn refuses_gnu_sparse_files() {
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..6].copy_from_slice(b"sparse");
        header.set_entry_type(EntryType::GNUSparse);
        header.set_mode(0o644);
        header.set_size(0);
        header.as_gnu_mut().unwrap().set_real_size(0);
        header.set_cksum();
        let mut archive = TestArchive::new();
        archive.builder.append(&header, &b""[..]).unwrap();
        let error = assert_refused(archive);
        assert!(
            matches!(&error, UnpackError::ForbiddenType { entry, .. } if entry == Path::new("sparse")),
            "{error}"
        );
        assert_names_entry(&error, "sparse");
    }

    #[test]
    fn refuses_setuid_and_setgid_unless_allowed() {
        let error = assert_refused(TestArchive::new().file("bin/su", 0o4755, b"x"));
        assert!(matches!(&error, UnpackError::Setuid { entry, mode }
                if entry == Path::new("bin/su") && *mode == 0o4755));
        assert_names_entry(&error, "bin/su");

        let error = assert_refused(TestArchive::new().directory("shared/", 0o2775));
        assert!(matches!(&error, UnpackError::Setuid { .. }));
        assert_names_entry(&error, "shared/");
    }

    #[test]
    fn keeps_setuid_when_the_policy_allows_it() {
        let scratch = Scratch::new();
        let archive = TestArchive::new()
            .file("bin/su", 0o4755, b"x")
            .directory("shared/", 0o2775);
        fs::write(scratch.archive_path(), archive.compressed()).unwrap();
        let policy = UnpackPolicy {
            allow_setuid: true,
            ..default_policy()
        };
        unpack_payload(&scratch.archive_path(), &scratch.destination(), &policy).unwrap();
        assert_eq!(mode_of(&scratch.destination().join("bin/su")), 0o4755);
        assert_eq!(mode_of(&scratch.destination().join("shared")), 0o2775);
    }

    #[test]
    fn refuses_a_truncated_tar_whose_header_promises_more_data() {
        let tar_bytes = TestArchive::new()
            .file("complete", 0o644, b"fine")
            .file("big", 0o644, &[1; 4096])
            .tar_bytes();
        // Two headers, the first entry's padded data, then 1000 of 4096 bytes.
        let truncated = &tar_bytes[..512 + 512 + 512 + 1000];
        let payload = zstd::encode_all(truncated, 3).unwrap();
        let error = assert_refused_bytes(&payload, &default_policy());
        assert!(
            matches!(&error, UnpackError::Corrupt { near_entry: Some(entry), .. } if entry == Path::new("big")),
            "{error}"
        );
        assert_names_entry(&error, "big");
    }

    #[test]
    fn removes_trees_with_read_only_directories_without_following_symlinks() {
        let scratch = Scratch::new();
        let root = scratch.root.join("images/old");
        fs::create_dir_all(root.join("ro")).unwrap();
        fs::write(root.join("ro/file"), b"x").unwrap();
        fs::create_dir_all(root.join("locked/inner")).unwrap();
        fs::write(root.join("locked/inner/file"), b"x").unwrap();
        std::os::unix::fs::symlink(scratch.sentinel(), root.join("outside")).unwrap();
        fs::set_permissions(root.join("ro"), Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(root.join("locked"), Permissions::from_mode(0o000)).unwrap();
        let sentinel_before = fs::read(scratch.sentinel().join("keep.txt")).unwrap();

        remove_unpacked_tree(&root).unwrap();

        assert!(fs::symlink_metadata(&root).is_err());
        assert_eq!(
            fs::read(scratch.sentinel().join("keep.txt")).unwrap(),
            sentinel_before
        );
        assert_eq!(mode_of(&scratch.sentinel()), 0o755);
    }
}
