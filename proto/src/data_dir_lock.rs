//! One process per data dir: `flotte-server run` and `flotte-agent run` hold
//! an exclusive `flock` on `<data dir>/lock` for their whole life and write
//! their pid in it, so a second one is refused naming the first (two agents
//! on one data dir would stop each other's service and replace each other's
//! session every second). The kernel drops the lock when the process dies,
//! however it dies, so a stale file never blocks a restart.
//!
//! Also here: what to say when a data dir cannot be read, so that a
//! permission problem (typically `init` run as root and the service as
//! another user) is never reported as "no CA" or "not enrolled".

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The lock file's name inside a data dir.
pub const LOCK_FILE: &str = "lock";

/// Held for as long as the process uses the data dir; dropping it unlocks.
#[derive(Debug)]
pub struct DataDirLock {
    _lock: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirLockError {
    #[error(
        "{data_dir} is in use by another {program} (pid {holder}): one {program} per data dir"
    )]
    Held {
        data_dir: PathBuf,
        program: String,
        holder: String,
    },
    #[error("cannot lock {path}: {source}{}", permission_hint(source))]
    Io { path: PathBuf, source: io::Error },
}

/// The hint added to an I/O error on a data dir: for "permission denied",
/// who we run as and the usual cause; nothing for other errors.
pub fn permission_hint(error: &io::Error) -> String {
    if error.kind() != io::ErrorKind::PermissionDenied {
        return String::new();
    }
    let user = nix::unistd::getuid();
    format!(
        " — the data dir is not accessible to this process (uid {user}); was it made by \
         another user (e.g. `init` run as root, the service as flotte)? Give it to the \
         service's user (`chown -R`) or run as its owner"
    )
}

/// An I/O error on `path` inside a data dir, with [`permission_hint`].
pub fn describe_io_error(path: &Path, error: &io::Error) -> String {
    format!("{}: {error}{}", path.display(), permission_hint(error))
}

/// Takes the data dir's lock for `program` (e.g. "flotte-agent"), or says
/// which process holds it.
pub fn lock_data_dir(data_dir: &Path, program: &str) -> Result<DataDirLock, DataDirLockError> {
    let path = data_dir.join(LOCK_FILE);
    let io_error = |source| DataDirLockError::Io {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_error)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            return Err(DataDirLockError::Held {
                data_dir: data_dir.to_owned(),
                program: program.to_owned(),
                holder: holder_pid(&mut file),
            })
        }
        Err((_, errno)) => return Err(io_error(io::Error::from(errno))),
    };
    lock.set_len(0).map_err(io_error)?;
    lock.rewind().map_err(io_error)?;
    writeln!(lock, "{}", std::process::id()).map_err(io_error)?;
    lock.sync_all().map_err(io_error)?;
    Ok(DataDirLock { _lock: lock })
}

/// The pid the holder wrote, bounded (the file is ours, but a data dir may
/// have been tampered with); "unknown" if it wrote none yet.
fn holder_pid(file: &mut File) -> String {
    let mut text = String::new();
    let read = file.take(32).read_to_string(&mut text);
    let pid = text.trim();
    if read.is_ok() && !pid.is_empty() && pid.bytes().all(|byte| byte.is_ascii_digit()) {
        pid.to_owned()
    } else {
        "unknown".to_owned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn temporary_directory(name: &str) -> PathBuf {
        let directory =
            std::env::temp_dir().join(format!("flotte-lock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        directory
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_a_dropped_one_is_free() {
        let directory = temporary_directory("second");
        let held = lock_data_dir(&directory, "flotte-agent").unwrap();
        let refused = lock_data_dir(&directory, "flotte-agent").unwrap_err();
        let message = refused.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id()))
                && message.contains("in use by another flotte-agent"),
            "{message}"
        );
        drop(held);
        lock_data_dir(&directory, "flotte-agent").expect("free once dropped");
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn permission_denied_is_named_with_the_hint_and_other_errors_are_not() {
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let text = describe_io_error(Path::new("/var/lib/flotte/ca/ca.pem"), &denied);
        assert!(
            text.contains("ca.pem") && text.contains("not accessible to this process"),
            "{text}"
        );
        let missing = io::Error::from(io::ErrorKind::NotFound);
        assert!(permission_hint(&missing).is_empty());
    }
}
