//! Reading, as root, files that someone else controls: a login's
//! `~/.ssh/authorized_keys`, the supervised service's log. Such a file can
//! be a symbolic link to `/etc/shadow` or `/dev/zero`, a FIFO that blocks
//! `open(2)` forever, or gigabytes long; the checks here make each of those
//! a clear refusal instead of a leak, a hang or an exhausted memory.
//!
//! The rule: below a trusted base directory (a home directory from the user
//! database, a directory from the agent's settings) no component is ever
//! followed if it is a symbolic link (each directory is opened with
//! `O_NOFOLLOW | O_DIRECTORY` relative to the previous one, the file with
//! `O_NOFOLLOW | O_NONBLOCK`); the *opened* file must be a regular file
//! owned by the expected uid or root, and a root-owned one must have a
//! single link (a hard link to a root-only file would pass every other
//! check); at most a cap of bytes is read.
//!
//! What must never happen here: returning a byte of a file that failed a
//! check, or being called on the session loop (this is blocking I/O: a file
//! on a hung network or FUSE mount blocks whatever reads it; callers run it
//! on the blocking pool with a timeout).

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{open, openat, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};

/// The most of a user's file the agent reads.
pub const USER_FILE_MAX_BYTES: u64 = 256 * 1024;

/// Who may own the file besides root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Root only (a file the agent itself writes).
    RootOnly,
    /// This uid (a login's own file) or root.
    UidOrRoot(u32),
}

impl Owner {
    /// Files this process writes (the agent runs as root in production).
    pub fn agent_itself() -> Owner {
        Owner::UidOrRoot(nix::unistd::geteuid().as_raw())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserFileError {
    #[error("{path} does not exist")]
    NotFound { path: PathBuf },
    #[error("{path} is a symbolic link, never followed")]
    SymbolicLink { path: PathBuf },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is owned by uid {uid}, which is neither {expected} nor root")]
    Owner {
        path: PathBuf,
        uid: u32,
        expected: String,
    },
    #[error("{path} is owned by root and has {links} hard links: it may be another root file")]
    HardLinked { path: PathBuf, links: u64 },
    #[error("{path} is {size} bytes, more than the {max} bytes read")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{path} must be a relative path of plain names")]
    NotPlainRelative { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl UserFileError {
    /// The file (or a directory on its path) is simply not there: nothing
    /// to report, unlike every other error.
    pub fn is_not_found(&self) -> bool {
        matches!(self, UserFileError::NotFound { .. })
    }
}

fn error_of_open(path: &Path, errno: Errno) -> UserFileError {
    let path = path.to_owned();
    match errno {
        Errno::ENOENT => UserFileError::NotFound { path },
        // O_NOFOLLOW on a symbolic link.
        Errno::ELOOP => UserFileError::SymbolicLink { path },
        Errno::ENOTDIR => UserFileError::NotADirectory { path },
        other => UserFileError::Io {
            path,
            source: io::Error::from(other),
        },
    }
}

fn is_symbolic_link_at(directory: &OwnedFd, name: &std::ffi::OsStr) -> bool {
    fstatat(directory, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|status| {
        SFlag::from_bits_truncate(status.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
    })
}

fn kind_of(metadata: &Metadata) -> &'static str {
    let file_type = metadata.file_type();
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens `base/relative` without following a symbolic link below `base`
/// and without blocking, and checks the opened file: regular, owned as
/// `owner` says, a root-owned one with a single link. `base` itself is
/// trusted (it may be a link set up by an administrator).
pub fn open_checked(
    base: &Path,
    relative: &Path,
    owner: Owner,
) -> Result<(File, Metadata), UserFileError> {
    let full_path = base.join(relative);
    let names: Vec<&std::ffi::OsStr> = relative
        .components()
        .map(|component| match component {
            Component::Normal(name) => Ok(name),
            _ => Err(UserFileError::NotPlainRelative {
                path: relative.to_owned(),
            }),
        })
        .collect::<Result<_, _>>()?;
    let Some((file_name, directories)) = names.split_last() else {
        return Err(UserFileError::NotPlainRelative {
            path: relative.to_owned(),
        });
    };
    let directory_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut directory: OwnedFd =
        open(base, directory_flags, Mode::empty()).map_err(|errno| error_of_open(base, errno))?;
    let mut walked = base.to_owned();
    for name in directories {
        walked.push(name);
        directory = match openat(
            &directory,
            *name,
            directory_flags | OFlag::O_NOFOLLOW,
            Mode::empty(),
        ) {
            Ok(opened) => opened,
            // With O_DIRECTORY, Linux answers ENOTDIR for a symbolic link.
            Err(Errno::ENOTDIR) if is_symbolic_link_at(&directory, name) => {
                return Err(UserFileError::SymbolicLink { path: walked })
            }
            Err(errno) => return Err(error_of_open(&walked, errno)),
        };
    }
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
    // writer forever. O_NOCTTY: a terminal never becomes ours.
    let descriptor = openat(
        &directory,
        *file_name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(|errno| error_of_open(&full_path, errno))?;
    let file = File::from(descriptor);
    let metadata = file.metadata().map_err(|source| UserFileError::Io {
        path: full_path.clone(),
        source,
    })?;
    if !metadata.file_type().is_file() {
        return Err(UserFileError::NotRegular {
            path: full_path,
            kind: kind_of(&metadata),
        });
    }
    let uid = metadata.uid();
    let owner_allowed = match owner {
        Owner::RootOnly => uid == 0,
        Owner::UidOrRoot(expected) => uid == 0 || uid == expected,
    };
    if !owner_allowed {
        let expected = match owner {
            Owner::RootOnly => "root only".to_owned(),
            Owner::UidOrRoot(expected) => format!("the login's uid {expected}"),
        };
        return Err(UserFileError::Owner {
            path: full_path,
            uid,
            expected,
        });
    }
    if uid == 0 && metadata.nlink() > 1 {
        return Err(UserFileError::HardLinked {
            path: full_path,
            links: metadata.nlink(),
        });
    }
    Ok((file, metadata))
}

/// The whole of `base/relative` after [`open_checked`], refused if it is
/// (or grows while read to) more than `max_bytes`.
pub fn read_checked(
    base: &Path,
    relative: &Path,
    owner: Owner,
    max_bytes: u64,
) -> Result<Vec<u8>, UserFileError> {
    let (file, metadata) = open_checked(base, relative, owner)?;
    let path = base.join(relative);
    if metadata.len() > max_bytes {
        return Err(UserFileError::TooLarge {
            path,
            size: metadata.len(),
            max: max_bytes,
        });
    }
    let mut bytes = Vec::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| UserFileError::Io {
            path: path.clone(),
            source,
        })?;
    let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if read > max_bytes {
        return Err(UserFileError::TooLarge {
            path,
            size: read,
            max: max_bytes,
        });
    }
    Ok(bytes)
}

/// `path` split into its directory (the trusted base) and its file name,
/// for files named by the agent's own settings.
pub fn split_base(path: &Path) -> Option<(&Path, &Path)> {
    let name = path.file_name()?;
    Some((path.parent()?, Path::new(name)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let path =
                std::env::temp_dir().join(format!("flotte-user-files-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(path.join("home/.ssh")).unwrap();
            Scratch(path)
        }
        fn home(&self) -> PathBuf {
            self.0.join("home")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn own_uid() -> u32 {
        nix::unistd::getuid().as_raw()
    }

    fn keys_file() -> &'static Path {
        Path::new(".ssh/authorized_keys")
    }

    fn read_keys(scratch: &Scratch) -> Result<Vec<u8>, UserFileError> {
        read_checked(
            &scratch.home(),
            keys_file(),
            Owner::UidOrRoot(own_uid()),
            USER_FILE_MAX_BYTES,
        )
    }

    #[test]
    fn a_normal_file_is_read_whole() {
        let scratch = Scratch::new();
        std::fs::write(scratch.home().join(keys_file()), "ssh-ed25519 AAAA me\n").unwrap();
        assert_eq!(read_keys(&scratch).unwrap(), b"ssh-ed25519 AAAA me\n");
    }

    #[test]
    fn a_missing_file_or_directory_is_not_found() {
        let scratch = Scratch::new();
        assert!(read_keys(&scratch).unwrap_err().is_not_found());
        std::fs::remove_dir(scratch.home().join(".ssh")).unwrap();
        assert!(read_keys(&scratch).unwrap_err().is_not_found());
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let scratch = Scratch::new();
        nix::unistd::mkfifo(
            &scratch.home().join(keys_file()),
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        // Without O_NONBLOCK this open would wait for a writer forever.
        let error = read_keys(&scratch).unwrap_err();
        assert!(
            matches!(error, UserFileError::NotRegular { kind: "FIFO", .. }),
            "{error}"
        );
        assert!(error.to_string().contains("is a FIFO"), "{error}");
    }

    #[test]
    fn a_symbolic_link_to_dev_zero_is_refused() {
        let scratch = Scratch::new();
        symlink("/dev/zero", scratch.home().join(keys_file())).unwrap();
        let error = read_keys(&scratch).unwrap_err();
        assert!(
            matches!(error, UserFileError::SymbolicLink { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_symbolic_link_to_a_root_only_file_never_returns_its_contents() {
        let scratch = Scratch::new();
        let secret = scratch.0.join("secret");
        std::fs::write(&secret, "root:$6$secret-hash:19000::::::\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        symlink(&secret, scratch.home().join(keys_file())).unwrap();
        let error = read_keys(&scratch).unwrap_err();
        assert!(
            matches!(error, UserFileError::SymbolicLink { .. }),
            "{error}"
        );
        assert!(!error.to_string().contains("secret-hash"), "{error}");
    }

    #[test]
    fn a_hard_link_to_a_root_file_is_refused() {
        if own_uid() != 0 {
            // Only root-owned files are suspect; a non-root run owns its files.
            return;
        }
        let scratch = Scratch::new();
        let secret = scratch.0.join("secret");
        std::fs::write(&secret, "root:$6$secret-hash\n").unwrap();
        std::fs::hard_link(&secret, scratch.home().join(keys_file())).unwrap();
        let error = read_keys(&scratch).unwrap_err();
        assert!(
            matches!(error, UserFileError::HardLinked { links: 2, .. }),
            "{error}"
        );
    }

    #[test]
    fn a_symlinked_ssh_directory_is_refused() {
        let scratch = Scratch::new();
        let elsewhere = scratch.0.join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("authorized_keys"), "ssh-ed25519 AAAA\n").unwrap();
        std::fs::remove_dir(scratch.home().join(".ssh")).unwrap();
        symlink(&elsewhere, scratch.home().join(".ssh")).unwrap();
        let error = read_keys(&scratch).unwrap_err();
        assert!(
            matches!(&error, UserFileError::SymbolicLink { path } if path.ends_with(".ssh")),
            "{error}"
        );
    }

    #[test]
    fn an_oversized_file_is_refused_and_the_cap_itself_is_read() {
        let scratch = Scratch::new();
        let path = scratch.home().join(keys_file());
        std::fs::write(&path, vec![b'#'; USER_FILE_MAX_BYTES as usize]).unwrap();
        assert_eq!(
            read_keys(&scratch).unwrap().len() as u64,
            USER_FILE_MAX_BYTES
        );
        std::fs::write(&path, vec![b'#'; USER_FILE_MAX_BYTES as usize + 1]).unwrap();
        let error = read_keys(&scratch).unwrap_err();
        assert!(
            matches!(error, UserFileError::TooLarge { size, .. } if size == USER_FILE_MAX_BYTES + 1),
            "{error}"
        );
    }

    #[test]
    fn a_file_of_another_owner_is_refused() {
        let scratch = Scratch::new();
        let path = scratch.home().join(keys_file());
        std::fs::write(&path, "ssh-ed25519 AAAA\n").unwrap();
        // As root the file is given away; otherwise it is ours, not root's.
        let file_owner = if own_uid() == 0 {
            std::os::unix::fs::chown(&path, Some(4243), None).unwrap();
            4243
        } else {
            own_uid()
        };
        let read_as =
            |owner| read_checked(&scratch.home(), keys_file(), owner, USER_FILE_MAX_BYTES);
        assert!(read_as(Owner::UidOrRoot(file_owner)).is_ok());
        let error = read_as(Owner::UidOrRoot(file_owner + 1)).unwrap_err();
        assert!(
            matches!(error, UserFileError::Owner { uid, .. } if uid == file_owner),
            "{error}"
        );
        assert!(matches!(
            read_as(Owner::RootOnly),
            Err(UserFileError::Owner { .. })
        ));
    }

    #[test]
    fn paths_that_climb_or_start_at_the_root_are_refused() {
        let scratch = Scratch::new();
        for relative in ["../x", "/etc/shadow", "", "a/../b"] {
            let error = read_checked(
                &scratch.home(),
                Path::new(relative),
                Owner::RootOnly,
                USER_FILE_MAX_BYTES,
            )
            .unwrap_err();
            assert!(
                matches!(error, UserFileError::NotPlainRelative { .. }),
                "{relative}: {error}"
            );
        }
    }
}
