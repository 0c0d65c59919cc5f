//! Making an unpacked image durable before the swap points `current` at
//! it: every regular file and directory of the tree is fsynced (never
//! through a symlink), or the whole file system where the agent cannot open
//! an entry.

use std::fs::{self, File};
use std::io;
use std::path::Path;

/// Fsyncs every regular file and directory under `root` (and `root`
/// itself), without following symlinks, so that an unpacked image is durable
/// before the caller points `current` at it. Syncing the directory that
/// holds `root` remains the caller's job. Where an entry cannot be opened
/// (its mode denies the agent), the whole file system of `root` is synced
/// instead. Errors name the path they happened at.
pub fn sync_tree(root: &Path) -> io::Result<()> {
    let mut pending_paths = vec![root.to_path_buf()];
    let mut needs_file_system_sync = false;
    while let Some(path) = pending_paths.pop() {
        let file_type = fs::symlink_metadata(&path)
            .map_err(io_error_naming(&path))?
            .file_type();
        if file_type.is_dir() {
            match fs::read_dir(&path) {
                Ok(children) => {
                    for child in children {
                        pending_paths.push(child.map_err(io_error_naming(&path))?.path());
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                    needs_file_system_sync = true;
                }
                Err(error) => return Err(io_error_naming(&path)(error)),
            }
        }
        // Symlinks have no data of their own: their directory entry is made
        // durable by the fsync of the directory holding them.
        if file_type.is_dir() || file_type.is_file() {
            match File::open(&path) {
                Ok(handle) => handle.sync_all().map_err(io_error_naming(&path))?,
                Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                    needs_file_system_sync = true;
                }
                Err(error) => return Err(io_error_naming(&path)(error)),
            }
        }
    }
    if needs_file_system_sync {
        sync_file_system_of(root).map_err(io_error_naming(root))?;
    }
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn sync_file_system_of(root: &Path) -> io::Result<()> {
    let root_handle = File::open(root)?;
    nix::unistd::syncfs(&root_handle).map_err(io::Error::from)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn sync_file_system_of(_root: &Path) -> io::Result<()> {
    // No per-file-system sync here: flush everything.
    nix::unistd::sync();
    Ok(())
}

/// Keeps the path in an I/O error that is returned as a plain `io::Error`.
fn io_error_naming(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |error| io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::super::test_archives::*;
    use super::super::unpack_payload;
    use super::*;

    #[test]
    fn sync_tree_skips_symlinks_and_syncs_everything_else() {
        let scratch = Scratch::new();
        let archive = TestArchive::new()
            .file("bin/tool", 0o755, b"x")
            .file("secret", 0o000, b"no one may read this")
            .symlink("dangling", "nowhere")
            .directory("ro/", 0o555);
        fs::write(scratch.archive_path(), archive.compressed()).unwrap();
        unpack_payload(
            &scratch.archive_path(),
            &scratch.destination(),
            &default_policy(),
        )
        .unwrap();
        sync_tree(&scratch.destination()).unwrap();
        let missing = sync_tree(&scratch.root.join("missing")).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
    }
}
