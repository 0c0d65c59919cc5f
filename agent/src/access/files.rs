//! The managed directory (`AuthorizedKeysFile /etc/flotte/authorized_keys/%u`):
//! one file per login, replaced atomically, root-owned 0644 in 0755
//! directories so that sshd's `StrictModes` accepts them; files of logins
//! no longer granted are removed. Also reads what is actually on disk for
//! the report: the managed file and the login's own `~/.ssh/authorized_keys`
//! — the latter only through `user_files` (no symbolic link below the home
//! directory, regular files owned by the login or root, 256 KiB at most).
//! Those reads block; `scan` runs them off the session loop.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flotte_proto::files::write_atomically_with_mode;
use flotte_proto::ssh_keys::key_in_authorized_keys_line;

use super::policy::{authorized_keys_text, LocalKey};
use crate::user_files::{read_checked, Owner, UserFileError, USER_FILE_MAX_BYTES};

/// The managed files are the agent's own (root's, in a root directory): a
/// larger cap than a user's file, for a login many people share.
const MANAGED_FILE_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// What one sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub written: Vec<String>,
    pub removed: Vec<String>,
}

/// What one file of one login holds, or why it was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileContents {
    /// `type base64` of each key line.
    Keys(Vec<String>),
    /// Refused (a link, a FIFO, too large, another owner…) or no answer in
    /// time: the reason, which never quotes the file.
    NotRead(String),
}

/// One file for one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundFile {
    pub login: String,
    pub source: String,
    pub contents: FileContents,
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

/// The keys of `base/relative` read under the rules of `user_files`;
/// `None` when the file is not there.
fn keys_in_file(
    login: &str,
    base: &Path,
    relative: &Path,
    owner: Owner,
    max_bytes: u64,
) -> Option<FoundFile> {
    let contents = match read_checked(base, relative, owner, max_bytes) {
        Ok(bytes) => FileContents::Keys(
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(key_in_authorized_keys_line)
                .collect(),
        ),
        Err(error) if error.is_not_found() => return None,
        Err(error) => FileContents::NotRead(describe_refusal(&error)),
    };
    Some(FoundFile {
        login: login.to_owned(),
        source: base.join(relative).display().to_string(),
        contents,
    })
}

fn describe_refusal(error: &UserFileError) -> String {
    format!("not read: {error}")
}

/// A login of this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginAccount {
    pub home: PathBuf,
    pub uid: u32,
    /// Login shell (a `nologin` one marks a system account).
    pub shell: PathBuf,
}

/// How logins are looked up on this machine (a seam for tests). Lookups
/// may block (NSS over the network): called off the session loop only.
pub trait LoginDirectory: Send + Sync {
    /// The login's account, `None` if the login does not exist.
    fn account_of(&self, login: &str) -> Option<LoginAccount>;
}

/// The system's user database (`getpwnam`).
#[derive(Debug, Clone, Copy)]
pub struct SystemLogins;

impl LoginDirectory for SystemLogins {
    fn account_of(&self, login: &str) -> Option<LoginAccount> {
        nix::unistd::User::from_name(login)
            .ok()
            .flatten()
            .map(|user| LoginAccount {
                home: user.dir,
                uid: user.uid.as_raw(),
                shell: user.shell,
            })
    }
}

/// What is on disk for one login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginFindings {
    pub files: Vec<FoundFile>,
    /// The login does not exist on this machine.
    pub missing: bool,
}

/// Reads the managed file and `~/.ssh/authorized_keys` of one login
/// (blocking: run it off the session loop).
pub fn read_login(
    managed: &ManagedDirectory,
    login: &str,
    directory: &dyn LoginDirectory,
) -> LoginFindings {
    let mut findings = LoginFindings::default();
    if !is_safe_login(login) {
        return findings;
    }
    findings.files.extend(keys_in_file(
        login,
        &managed.directory,
        Path::new(login),
        Owner::agent_itself(),
        MANAGED_FILE_MAX_BYTES,
    ));
    match directory.account_of(login) {
        Some(account) => findings.files.extend(keys_in_file(
            login,
            &account.home,
            &Path::new(".ssh").join("authorized_keys"),
            Owner::UidOrRoot(account.uid),
            USER_FILE_MAX_BYTES,
        )),
        None => findings.missing = true,
    }
    findings
}

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Logins with their home directories, all of this process's uid.
    pub(in crate::access) struct FakeLogins(pub BTreeMap<String, PathBuf>);

    impl LoginDirectory for FakeLogins {
        fn account_of(&self, login: &str) -> Option<LoginAccount> {
            self.0.get(login).map(|home| LoginAccount {
                home: home.clone(),
                uid: nix::unistd::getuid().as_raw(),
                shell: PathBuf::from("/bin/sh"),
            })
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
        assert_eq!(
            read_login(&managed, "alice", &logins),
            LoginFindings {
                files: vec![
                    FoundFile {
                        login: "alice".into(),
                        source: managed.file_of("alice").display().to_string(),
                        contents: FileContents::Keys(vec!["ssh-ed25519 A".to_owned()]),
                    },
                    FoundFile {
                        login: "alice".into(),
                        source: home.join(".ssh/authorized_keys").display().to_string(),
                        contents: FileContents::Keys(vec!["ssh-ed25519 HAND".to_owned()]),
                    },
                ],
                missing: false,
            }
        );
        assert_eq!(
            read_login(&managed, "carol", &logins),
            LoginFindings {
                files: Vec::new(),
                missing: true
            }
        );

        // A FIFO in the login's place: refused with its reason, at once.
        fs::remove_file(home.join(".ssh/authorized_keys")).unwrap();
        nix::unistd::mkfifo(
            &home.join(".ssh/authorized_keys"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let findings = read_login(&managed, "alice", &logins);
        assert!(
            matches!(&findings.files[1].contents, FileContents::NotRead(reason) if reason.contains("is a FIFO, not a regular file")),
            "{findings:?}"
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
