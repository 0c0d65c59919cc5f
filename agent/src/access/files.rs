//! The managed directory (`AuthorizedKeysFile /etc/flotte/authorized_keys/%u`):
//! one file per login, replaced atomically, root-owned 0644 in 0755
//! directories so that sshd's `StrictModes` accepts them; files of logins
//! no longer granted are removed. Also reads what is actually on disk for
//! the report: the managed file and the login's own `~/.ssh/authorized_keys`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flotte_proto::files::write_atomically_with_mode;
use flotte_proto::ssh_keys::key_in_authorized_keys_line;

use super::policy::{authorized_keys_text, LocalKey};

/// What one sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub written: Vec<String>,
    pub removed: Vec<String>,
}

/// Keys found in one file for one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundFile {
    pub login: String,
    pub source: String,
    pub public_keys: Vec<String>,
}

/// A login as sshd passes it in `%u`: never a path, never a dotfile.
pub fn is_safe_login(login: &str) -> bool {
    !login.is_empty()
        && login.len() <= 32
        && !login.starts_with('.')
        && !login.starts_with('-')
        && login.chars().all(|character| {
            character.is_ascii_alphanumeric() || matches!(character, '_' | '-' | '.')
        })
}

#[derive(Debug, Clone)]
pub struct ManagedDirectory {
    pub directory: PathBuf,
}

impl ManagedDirectory {
    pub fn new(directory: &Path) -> Self {
        ManagedDirectory {
            directory: directory.to_owned(),
        }
    }

    pub fn file_of(&self, login: &str) -> PathBuf {
        self.directory.join(login)
    }

    /// Makes the files match `keys`: writes what differs, removes files of
    /// logins absent from it. Unsafe login names are skipped (and logged).
    pub fn sync(&self, keys: &BTreeMap<String, Vec<LocalKey>>) -> io::Result<SyncOutcome> {
        create_traversable_dirs(&self.directory)?;
        // An existing directory keeps its mode otherwise; sshd refuses a
        // group- or world-writable one.
        fs::set_permissions(&self.directory, fs::Permissions::from_mode(0o755))?;
        let mut outcome = SyncOutcome::default();
        for (login, login_keys) in keys {
            if !is_safe_login(login) {
                tracing::warn!(%login, "refusing to manage a login that is not a plain name");
                continue;
            }
            let path = self.file_of(login);
            let text = authorized_keys_text(login_keys);
            let current = fs::read_to_string(&path).ok();
            let mode_ok = fs::metadata(&path)
                .is_ok_and(|metadata| metadata.permissions().mode() & 0o777 == 0o644);
            if current.as_deref() != Some(text.as_str()) || !mode_ok {
                write_atomically_with_mode(&path, text.as_bytes(), 0o644)?;
                // The umask may have narrowed the mode at creation.
                fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
                outcome.written.push(login.clone());
            }
        }
        for entry in fs::read_dir(&self.directory)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Temp files of an interrupted write start with '.'.
            if !is_safe_login(&name) || keys.contains_key(&name) {
                continue;
            }
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
                outcome.removed.push(name);
            }
        }
        Ok(outcome)
    }

    /// Problems sshd's `StrictModes` would have with the directory and its
    /// parents: not owned by root, or writable by group or others.
    pub fn strict_modes_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut path = Some(self.directory.as_path());
        while let Some(current) = path {
            if let Ok(metadata) = fs::metadata(current) {
                if metadata.uid() != 0 {
                    problems.push(format!(
                        "{} is owned by uid {}, not root",
                        current.display(),
                        metadata.uid()
                    ));
                }
                if metadata.mode() & 0o022 != 0 && metadata.mode() & 0o1000 == 0 {
                    problems.push(format!(
                        "{} is writable by group or others (mode {:o})",
                        current.display(),
                        metadata.mode() & 0o7777
                    ));
                }
            }
            path = current.parent();
        }
        problems
    }
}

/// Creates `directory` and its missing parents as 0755 whatever the umask
/// (the agent's unit sets `UMask=0077`): sshd reads the key files with the
/// login's own uid, which must be able to traverse every parent.
fn create_traversable_dirs(directory: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = directory
        .ancestors()
        .take_while(|ancestor| !ancestor.exists())
        .collect();
    for ancestor in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(0o755).create(ancestor) {
            Ok(()) => fs::set_permissions(ancestor, fs::Permissions::from_mode(0o755))?,
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn keys_in_file(path: &Path) -> Option<Vec<String>> {
    let text = fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(key_in_authorized_keys_line)
            .collect(),
    )
}

/// How logins are looked up on this machine (a seam for tests).
pub trait LoginDirectory: Send + Sync {
    /// The login's home directory, `None` if the login does not exist.
    fn home_of(&self, login: &str) -> Option<PathBuf>;
}

/// The system's user database (`getpwnam`).
#[derive(Debug, Clone, Copy)]
pub struct SystemLogins;

impl LoginDirectory for SystemLogins {
    fn home_of(&self, login: &str) -> Option<PathBuf> {
        nix::unistd::User::from_name(login)
            .ok()
            .flatten()
            .map(|user| user.dir)
    }
}

/// The keys on disk for each of `logins` (managed file and
/// `~/.ssh/authorized_keys`), and the logins that do not exist here.
pub fn scan(
    managed: &ManagedDirectory,
    logins: impl IntoIterator<Item = String>,
    directory: &dyn LoginDirectory,
) -> (Vec<FoundFile>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for login in logins {
        if !is_safe_login(&login) {
            continue;
        }
        let managed_file = managed.file_of(&login);
        if let Some(public_keys) = keys_in_file(&managed_file) {
            found.push(FoundFile {
                login: login.clone(),
                source: managed_file.display().to_string(),
                public_keys,
            });
        }
        match directory.home_of(&login) {
            Some(home) => {
                let own = home.join(".ssh").join("authorized_keys");
                if let Some(public_keys) = keys_in_file(&own) {
                    found.push(FoundFile {
                        login: login.clone(),
                        source: own.display().to_string(),
                        public_keys,
                    });
                }
            }
            None => missing.push(login),
        }
    }
    (found, missing)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    struct FakeLogins(BTreeMap<String, PathBuf>);

    impl LoginDirectory for FakeLogins {
        fn home_of(&self, login: &str) -> Option<PathBuf> {
            self.0.get(login).cloned()
        }
    }

    fn key(text: &str) -> LocalKey {
        LocalKey {
            public_key: format!("ssh-ed25519 {text}"),
            user: "alice".into(),
            grant_id: "g-1".into(),
            expires_at: None,
        }
    }

    #[test]
    fn sync_writes_0644_files_removes_stale_ones_and_scan_sees_hand_added_keys() {
        let root = std::env::temp_dir().join(format!("flotte-keys-{}", uuid::Uuid::new_v4()));
        let managed = ManagedDirectory::new(&root.join("authorized_keys"));
        let mut keys = BTreeMap::from([
            ("alice".to_owned(), vec![key("A")]),
            ("bob".to_owned(), vec![key("B")]),
        ]);
        let outcome = managed.sync(&keys).unwrap();
        assert_eq!(outcome.written, vec!["alice", "bob"]);
        let mode = fs::metadata(managed.file_of("alice"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(
            fs::metadata(&managed.directory)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        // Unchanged: nothing rewritten.
        assert_eq!(managed.sync(&keys).unwrap(), SyncOutcome::default());

        keys.remove("bob");
        let outcome = managed.sync(&keys).unwrap();
        assert_eq!(outcome.removed, vec!["bob"]);
        assert!(!managed.file_of("bob").exists());

        let home = root.join("home-alice");
        fs::create_dir_all(home.join(".ssh")).unwrap();
        fs::write(
            home.join(".ssh/authorized_keys"),
            "# mine\nno-pty ssh-ed25519 HAND added-by-hand\n",
        )
        .unwrap();
        let logins = FakeLogins(BTreeMap::from([("alice".to_owned(), home.clone())]));
        let (found, missing) = scan(&managed, ["alice".to_owned(), "carol".to_owned()], &logins);
        assert_eq!(missing, vec!["carol"]);
        let found: Vec<(String, Vec<String>)> = found
            .into_iter()
            .map(|file| (file.source, file.public_keys))
            .collect();
        assert_eq!(
            found,
            vec![
                (
                    managed.file_of("alice").display().to_string(),
                    vec!["ssh-ed25519 A".to_owned()]
                ),
                (
                    home.join(".ssh/authorized_keys").display().to_string(),
                    vec!["ssh-ed25519 HAND".to_owned()]
                ),
            ]
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn logins_that_could_be_paths_are_never_managed() {
        for login in ["alice", "deploy-1", "_svc", "a.b"] {
            assert!(is_safe_login(login), "{login}");
        }
        for login in ["", "../x", "a/b", ".hidden", "-rf", &"a".repeat(33)] {
            assert!(!is_safe_login(login), "{login:?}");
        }
    }
}
