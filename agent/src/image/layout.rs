//! Where images live on the machine and which one is committed:
//! `<data>/images/<digest>/` unpacked trees, `<data>/images/current` the
//! symlink the service runs from (switched atomically: new link + rename),
//! `<data>/images/committed.json` the committed current and previous images,
//! `<data>/images/<digest>.index.json` each tree's file index (made at
//! unpack, see `integrity`), `<data>/images/.drifted-<digest>/` the one
//! drifted tree kept for forensics by the last restore, and
//! `<data>/downloads/` partial payloads.

use std::path::{Path, PathBuf};

use flotte_proto::files;
use flotte_proto::v1::ImageRef;
use serde::{Deserialize, Serialize};

/// An image as the agent records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalImage {
    pub name: String,
    pub version: String,
    pub digest: String,
}

impl LocalImage {
    pub fn to_proto(&self) -> ImageRef {
        ImageRef {
            name: self.name.clone(),
            version: self.version.clone(),
            digest: self.digest.clone(),
        }
    }

    pub fn from_proto(image: &ImageRef) -> Self {
        LocalImage {
            name: image.name.clone(),
            version: image.version.clone(),
            digest: image.digest.clone(),
        }
    }

    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// The committed images: what the machine runs and what it ran before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub current: Option<LocalImage>,
    pub previous: Option<LocalImage>,
}

#[derive(Debug, Clone)]
pub struct ImageLayout {
    pub root: PathBuf,
}

impl ImageLayout {
    pub fn new(data_dir: &Path) -> Self {
        ImageLayout {
            root: data_dir.to_owned(),
        }
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn image_dir(&self, digest: &str) -> PathBuf {
        self.images_dir().join(digest)
    }

    /// The file index of `images/<digest>/`, beside it (never inside: the
    /// index is not part of the tree it describes).
    pub fn index_path(&self, digest: &str) -> PathBuf {
        self.images_dir().join(format!("{digest}.index.json"))
    }

    /// Where a restore keeps the drifted tree it replaced.
    pub fn drifted_dir(&self, digest: &str) -> PathBuf {
        self.images_dir().join(format!(".drifted-{digest}"))
    }

    pub fn current_link(&self) -> PathBuf {
        self.images_dir().join("current")
    }

    pub fn downloads_dir(&self) -> PathBuf {
        self.root.join("downloads")
    }

    pub fn partial_download(&self, digest: &str) -> PathBuf {
        self.downloads_dir().join(format!("{digest}.partial"))
    }

    fn committed_path(&self) -> PathBuf {
        self.images_dir().join("committed.json")
    }

    pub fn journal_path(&self) -> PathBuf {
        self.images_dir().join("swap-journal.json")
    }

    pub fn service_log(&self) -> PathBuf {
        self.root.join("service.log")
    }

    /// Creates `images/` and `downloads/`. `images/` is 0711 whatever the
    /// umask (the unit sets 0077): a service runs as an unprivileged user
    /// (never root by default) from `images/current`, so it must be able to
    /// pass through, not to list.
    pub fn ensure_dirs(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(self.images_dir())?;
        std::fs::set_permissions(self.images_dir(), std::fs::Permissions::from_mode(0o711))?;
        std::fs::create_dir_all(self.downloads_dir())
    }

    pub fn load_committed(&self) -> std::io::Result<Committed> {
        match std::fs::read(self.committed_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Committed::default()),
            Err(error) => Err(error),
        }
    }

    pub fn save_committed(&self, committed: &Committed) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(committed).map_err(std::io::Error::other)?;
        files::write_atomically(&self.committed_path(), &bytes)
    }

    /// Points `current` at `images/<digest>` atomically (new link, rename, fsync).
    pub fn switch_current(&self, digest: &str) -> std::io::Result<()> {
        let link = self.current_link();
        let temporary = self
            .images_dir()
            .join(format!(".current-{}", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        std::os::unix::fs::symlink(digest, &temporary)?;
        std::fs::rename(&temporary, &link)?;
        std::fs::File::open(self.images_dir())?.sync_all()
    }

    /// The digest `current` points at, if any.
    pub fn current_target(&self) -> Option<String> {
        std::fs::read_link(self.current_link())
            .ok()
            .map(|target| target.to_string_lossy().into_owned())
    }

    /// Removes unpacked images other than `keep`, oldest first, beyond `keep_count`.
    pub fn collect_garbage(
        &self,
        keep: &[&str],
        keep_count: usize,
    ) -> std::io::Result<Vec<String>> {
        let mut candidates = Vec::new();
        for entry in std::fs::read_dir(self.images_dir())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_digest = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if is_digest && entry.file_type()?.is_dir() && !keep.contains(&name.as_str()) {
                let modified = entry.metadata()?.modified()?;
                candidates.push((modified, name));
            }
        }
        candidates.sort();
        let excess = (candidates.len() + keep.len()).saturating_sub(keep_count.max(keep.len()));
        let mut removed = Vec::new();
        for (_, name) in candidates.into_iter().take(excess) {
            std::fs::remove_dir_all(self.image_dir(&name))?;
            match std::fs::remove_file(self.index_path(&name)) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
            removed.push(name);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switching_is_atomic_and_garbage_collection_keeps_current_and_previous() {
        let dir = std::env::temp_dir().join(format!("flotte-layout-{}", uuid::Uuid::new_v4()));
        let layout = ImageLayout::new(&dir);
        layout.ensure_dirs().unwrap();
        let digests: Vec<String> = (0..4).map(|i| format!("{i}").repeat(64)).collect();
        for digest in &digests {
            std::fs::create_dir_all(layout.image_dir(digest)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        layout.switch_current(&digests[3]).unwrap();
        assert_eq!(
            layout.current_target().as_deref(),
            Some(digests[3].as_str())
        );
        layout.switch_current(&digests[2]).unwrap();
        assert_eq!(
            layout.current_target().as_deref(),
            Some(digests[2].as_str())
        );
        let removed = layout
            .collect_garbage(&[&digests[2], &digests[3]], 3)
            .unwrap();
        assert_eq!(removed, vec![digests[0].clone()]);
        assert!(layout.image_dir(&digests[1]).exists());
        let committed = Committed {
            current: Some(LocalImage {
                name: "app".into(),
                version: "1.0.0".into(),
                digest: digests[2].clone(),
            }),
            previous: None,
        };
        layout.save_committed(&committed).unwrap();
        assert_eq!(layout.load_committed().unwrap(), committed);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
