//! Small durable-file helpers: atomic replacement (temp file, fsync, rename,
//! fsync directory) and private (0600 / 0700) creation for keys.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Replaces `path` with `contents` so that a crash leaves either the old or the
/// new file, never a torn one.
pub fn write_atomically_with_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let temp = parent.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    fs::rename(&temp, path)?;
    fs::File::open(parent)?.sync_all()
}

pub fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomically_with_mode(path, contents, 0o644)
}

/// Writes a secret (private key) readable by its owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomically_with_mode(path, contents, 0o600)
}

/// Creates a directory (and parents) with mode 0711: others may pass
/// through to a path they know, never list it.
pub fn create_passable_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(path)
}

/// Creates a directory (and parents) with mode 0700.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}
