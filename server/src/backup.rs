//! Server backup and restore: one archive (`tar`, zstd-compressed, then
//! encrypted with `age` to recipient public keys given at backup time)
//! holding a consistent copy of everything a server needs to come back as
//! itself — the store, the CA, the settings, the admin profile's certificate
//! (never its private key), image blobs and forensic bundles — with a
//! manifest of sizes and SHA-256 checksums.
//!
//! The archive holds the CA key, so it is readable only with an age identity
//! (`flotte-server backup-key` makes one); age's payload encryption is
//! authenticated, so a byte changed anywhere makes restore refuse. The
//! checksums inside catch a damaged write; the encryption catches tampering.
//! Temporary files (the store snapshot, the archive being written) live in a
//! fresh 0700 directory created exclusively next to the output, and are
//! created with `O_EXCL`; the finished archive is renamed into place.
//!
//! The store is one [`DatabasePart`]: SQLite's [`SqliteSnapshot`], or for a
//! data dir whose state is in PostgreSQL (replicas) [`PostgresDump`] — a
//! `pg_dump` custom-format dump of the database, image blobs and forensic
//! bundles included, which restore feeds to `pg_restore` into an empty
//! database it is given.
//!
//! The store is copied with SQLite's `VACUUM INTO`, which reads one
//! transaction-consistent snapshot while the running server keeps writing
//! (WAL readers never block the writer), so a backup needs no downtime.
//! `manifest.json` is the *last* entry: its checksums are of exactly the
//! bytes that were written, hashed while streaming.
//!
//! Restore refuses a non-empty target, never follows paths out of it, checks
//! every checksum and the store's integrity, and removes what it wrote if
//! anything is wrong. Nothing here talks to a running server: agents
//! reconnect to the restored one because it has the same CA, the same
//! machine records and the same certificate serials.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use age::secrecy::ExposeSecret;
use flotte_proto::data_dir_lock::describe_io_error;
use serde::{Deserialize, Serialize};

/// Written in every manifest; restore refuses any other.
pub const BACKUP_FORMAT: &str = "flotte-backup/1";
const MANIFEST_NAME: &str = "manifest.json";
const STORE_FILE: &str = "flotte.db";
/// What is copied from a data dir besides the store (missing ones are skipped,
/// except the CA). Addresses, logs and half-uploaded images are not state.
const INCLUDED: &[&str] = &[
    "server.toml",
    "ca",
    "audit",
    "admin",
    "images/blobs",
    "forensics",
];
/// Files of the included directories that are never backed up: the admin
/// profile's private key stays with the admin (who restores with their own
/// profile), so a leaked backup and identity do not hand out admin access.
const EXCLUDED: &[&str] = &["admin/key.pem"];
/// A manifest larger than this is not one we wrote.
const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;
/// An identity or recipients file larger than this is not one.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot snapshot the store {path}: {source}")]
    Snapshot {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot read the data dir: {0}")]
    Unreadable(String),
    #[error("{0} is not a server data dir (no ca/ca.pem or flotte.db)")]
    NotADataDir(PathBuf),
    #[error("{tool} failed: {reason}")]
    PostgresTool { tool: &'static str, reason: String },
    #[error("this backup holds a PostgreSQL dump: restore it with --store-url naming an empty database (and --store-password-file if it needs a password)")]
    NeedsDatabase,
    #[error("--store-url is for backups of a PostgreSQL data dir; this one holds a SQLite store")]
    NoDatabaseInBackup,
    #[error("refusing to restore into {0}: it exists and is not empty")]
    TargetNotEmpty(PathBuf),
    #[error("the archive has no valid manifest: {0}")]
    Manifest(String),
    #[error("{path}: checksum mismatch (manifest {expected}, archive {actual}): the archive is damaged or was changed")]
    Checksum {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: size mismatch (manifest {expected} bytes, archive {actual} bytes)")]
    Size {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("{0}: listed in the manifest but missing from the archive")]
    Missing(String),
    #[error("{0}: in the archive but not in the manifest")]
    Unlisted(String),
    #[error("unsafe archive entry {0:?}: only plain relative file paths are allowed")]
    UnsafeEntry(String),
    #[error("the restored store failed its integrity check: {0}")]
    Integrity(String),
    #[error("{0}")]
    Keys(String),
    #[error("cannot encrypt the backup: {0}")]
    Encrypt(String),
    #[error("the backup cannot be decrypted with the identity in {identity}: {reason}")]
    Decrypt { identity: PathBuf, reason: String },
    #[error(
        "the backup failed authentication: it was changed or damaged after it was written ({0})"
    )]
    Tampered(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub format: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    pub files: Vec<BackupFileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFileEntry {
    /// Relative to the data dir, `/`-separated.
    pub path: String,
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Unix permission bits (keys stay 0600).
    pub mode: u32,
}

/// A reader that hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    digest: ring::digest::Context,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
        }
    }

    fn finish(self) -> (u64, String) {
        (self.bytes, hex::encode(self.digest.finish().as_ref()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.digest.update(&buffer[..read]);
        self.bytes += read as u64;
        Ok(read)
    }
}

/// Every regular file under `root/relative` (a file or a directory), as
/// `/`-separated paths relative to `root`, sorted.
fn files_under(root: &Path, relative: &str) -> Result<Vec<String>, BackupError> {
    let start = root.join(relative);
    let metadata = match fs::symlink_metadata(&start) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(&start)(error)),
    };
    if metadata.is_file() {
        // An upload still being written is not state yet.
        if relative.ends_with(".partial") {
            return Ok(Vec::new());
        }
        return Ok(vec![relative.to_owned()]);
    }
    if !metadata.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(&start)
        .map_err(io_error(&start))?
        .collect::<Result<_, _>>()
        .map_err(io_error(&start))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        found.extend(files_under(root, &format!("{relative}/{name}"))?);
    }
    Ok(found)
}

/// What a finished backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    pub archive: PathBuf,
    pub manifest: BackupManifest,
}

/// The PostgreSQL database the data dir's settings name, if its state is
/// there (an unreadable or invalid settings file is left for the "not a data
/// dir" answer).
fn postgres_of(data_dir: &Path) -> Option<PostgresDump> {
    let settings = crate::config::read_toml::<crate::config::ServerConfigFile>(
        &crate::config::default_config_path(data_dir),
    )
    .ok()?;
    if settings.store.kind != crate::config::StoreKind::Postgres {
        return None;
    }
    Some(PostgresDump {
        url: settings.store.url.unwrap_or_default(),
        password_file: settings.store.password_file.map(|file| data_dir.join(file)),
    })
}

/// The dump of a PostgreSQL store inside an archive.
const POSTGRES_DUMP_FILE: &str = "flotte.pgdump";

/// Runs a PostgreSQL client tool (`pg_dump`, `pg_restore`) with `arguments`
/// and the password from `password_file` in its environment (never on its
/// command line, where other users could read it).
fn run_postgres_tool(
    tool: &'static str,
    arguments: &[&std::ffi::OsStr],
    password_file: Option<&Path>,
) -> Result<(), BackupError> {
    let mut command = std::process::Command::new(tool);
    command.args(arguments).env_remove("PGPASSWORD");
    if let Some(file) = password_file {
        // The server's own reader: bounded, trailing newline dropped.
        let password = crate::store::settings::read_password(file).map_err(|error| {
            BackupError::PostgresTool {
                tool,
                reason: error.to_string(),
            }
        })?;
        command.env("PGPASSWORD", password);
    }
    let output = command
        .output()
        .map_err(|error| BackupError::PostgresTool {
            tool,
            reason: format!("cannot run it ({error}); install PostgreSQL's client tools"),
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(BackupError::PostgresTool {
        tool,
        reason: format!(
            "{}: {}",
            output.status,
            stderr.trim().chars().take(400).collect::<String>()
        ),
    })
}

/// Reads a small key file (identity or recipients), refusing a large one.
fn read_key_file(path: &Path) -> Result<String, BackupError> {
    let file = fs::File::open(path).map_err(io_error(path))?;
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io_error(path))?;
    if text.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(BackupError::Keys(format!(
            "{}: larger than {MAX_KEY_FILE_BYTES} bytes, not a key file",
            path.display()
        )));
    }
    Ok(text)
}

/// The lines of a key file that hold keys (no blanks, no `#` comments).
fn key_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
}

/// The age recipients named by `given`: each an `age1…` public key, or a
/// file of them (one per line, `#` comments).
pub fn recipients(given: &[String]) -> Result<Vec<age::x25519::Recipient>, BackupError> {
    let mut recipients = Vec::new();
    for value in given {
        let from_file;
        let lines: Vec<&str> = if value.starts_with("age1") {
            vec![value.as_str()]
        } else {
            from_file = read_key_file(Path::new(value))?;
            key_lines(&from_file).collect()
        };
        for line in lines {
            let recipient = line.parse::<age::x25519::Recipient>().map_err(|error| {
                BackupError::Keys(format!(
                    "{} is not an age X25519 recipient (age1…): {error}",
                    flotte_proto::names::quoted_prefix(line)
                ))
            })?;
            recipients.push(recipient);
        }
    }
    if recipients.is_empty() {
        return Err(BackupError::Keys(
            "no recipient: a backup holds the CA key and is always encrypted (give --recipient age1… or a file of them; `flotte-server backup-key` makes a key pair)".into(),
        ));
    }
    Ok(recipients)
}

/// The age identities of an identity file (`AGE-SECRET-KEY-1…` lines).
pub fn identities(path: &Path) -> Result<Vec<age::x25519::Identity>, BackupError> {
    let text = read_key_file(path)?;
    let identities = key_lines(&text)
        .map(|line| {
            line.parse::<age::x25519::Identity>().map_err(|_| {
                BackupError::Keys(format!(
                    "{}: a line is not an age X25519 identity (AGE-SECRET-KEY-1…)",
                    path.display()
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if identities.is_empty() {
        return Err(BackupError::Keys(format!(
            "{}: holds no age identity",
            path.display()
        )));
    }
    Ok(identities)
}

/// Writes a new age identity to `out` (0600, never over an existing file)
/// and returns its recipient (the public key to back up to).
pub fn generate_backup_key(out: &Path) -> Result<String, BackupError> {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let text = format!(
        "# flotte backup identity: restores backups made with --recipient {recipient}\n{}\n",
        identity.to_string().expose_secret()
    );
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(io_error(out))?;
    io::Write::write_all(&mut file, text.as_bytes()).map_err(io_error(out))?;
    file.sync_all().map_err(io_error(out))?;
    Ok(recipient)
}

type EncryptedTar = tar::Builder<zstd::Encoder<'static, age::stream::StreamWriter<fs::File>>>;

/// The archive being written: entries go through tar, zstd and age, each
/// hashed while streaming into the manifest.
pub struct ArchiveWriter {
    builder: EncryptedTar,
    files: Vec<BackupFileEntry>,
    mtime: u64,
    path: PathBuf,
}

impl ArchiveWriter {
    /// Adds the regular file `source` as `name` with `mode`.
    pub fn append_file(&mut self, name: &str, source: &Path, mode: u32) -> Result<(), BackupError> {
        let reader = fs::File::open(source).map_err(io_error(source))?;
        let size = reader.metadata().map_err(io_error(source))?.len();
        let mut header = self.header(size, mode);
        let mut hashing = HashingReader::new(reader.take(size));
        self.builder
            .append_data(&mut header, name, &mut hashing)
            .map_err(io_error(source))?;
        let (written, sha256) = hashing.finish();
        self.files.push(BackupFileEntry {
            path: name.to_owned(),
            size: written,
            sha256,
            mode,
        });
        Ok(())
    }

    fn header(&self, size: u64, mode: u32) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(mode);
        header.set_mtime(self.mtime);
        header.set_entry_type(tar::EntryType::Regular);
        header
    }

    /// Writes the manifest last and closes every layer (age's final chunk
    /// included: without it the archive does not authenticate).
    fn finish(mut self, created_at: i64) -> Result<BackupManifest, BackupError> {
        let manifest = BackupManifest {
            format: BACKUP_FORMAT.to_owned(),
            created_at,
            files: std::mem::take(&mut self.files),
        };
        let manifest_bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|error| BackupError::Manifest(error.to_string()))?;
        let mut header = self.header(manifest_bytes.len() as u64, 0o600);
        self.builder
            .append_data(&mut header, MANIFEST_NAME, manifest_bytes.as_slice())
            .map_err(io_error(&self.path))?;
        let encoder = self.builder.into_inner().map_err(io_error(&self.path))?;
        let encrypted = encoder.finish().map_err(io_error(&self.path))?;
        let file = encrypted.finish().map_err(io_error(&self.path))?;
        file.sync_all().map_err(io_error(&self.path))?;
        Ok(manifest)
    }
}

/// The part of a backup that holds the durable store, written into the
/// archive by its backend's own means.
pub trait DatabasePart {
    /// Adds the database's entries to `archive`; `private_dir` is a fresh
    /// 0700 directory for temporary files, removed afterwards.
    fn add_to(&self, archive: &mut ArchiveWriter, private_dir: &Path) -> Result<(), BackupError>;
}

/// SQLite: a `VACUUM INTO` snapshot, consistent while the server writes.
#[derive(Debug, Clone)]
pub struct SqliteSnapshot {
    pub store: PathBuf,
}

impl DatabasePart for SqliteSnapshot {
    fn add_to(&self, archive: &mut ArchiveWriter, private_dir: &Path) -> Result<(), BackupError> {
        let snapshot = private_dir.join(STORE_FILE);
        snapshot_store(&self.store, &snapshot)?;
        archive.append_file(STORE_FILE, &snapshot, 0o600)
    }
}

/// PostgreSQL: a `pg_dump` of the whole database (custom format, no
/// owners), consistent in one transaction while the replicas write.
#[derive(Debug, Clone)]
pub struct PostgresDump {
    pub url: String,
    pub password_file: Option<PathBuf>,
}

impl DatabasePart for PostgresDump {
    fn add_to(&self, archive: &mut ArchiveWriter, private_dir: &Path) -> Result<(), BackupError> {
        let dump = private_dir.join(POSTGRES_DUMP_FILE);
        let file_argument = format!("--file={}", dump.display());
        let database_argument = format!("--dbname={}", self.url);
        run_postgres_tool(
            "pg_dump",
            &[
                "--format=custom".as_ref(),
                "--no-owner".as_ref(),
                file_argument.as_ref(),
                database_argument.as_ref(),
            ],
            self.password_file.as_deref(),
        )?;
        archive.append_file(POSTGRES_DUMP_FILE, &dump, 0o600)
    }
}

/// A directory only we can use, next to `out` (same file system, so the
/// finished archive is renamed into place), removed when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn next_to(out: &Path) -> Result<Self, BackupError> {
        let parent = match out.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        let path = parent.join(format!(".flotte-backup-{}", uuid::Uuid::new_v4().simple()));
        // `create`, not `create_all`: fails if anything is already there.
        std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
            .create(&path)
            .map_err(io_error(&path))?;
        Ok(PrivateDir(path))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Copies the store of `data_dir` (consistently, while the server may run)
/// and the files it needs into one archive at `out`, encrypted to
/// `recipients` (mode 0600).
pub fn backup(
    data_dir: &Path,
    out: &Path,
    recipients: &[age::x25519::Recipient],
    now: i64,
) -> Result<BackupSummary, BackupError> {
    let store = data_dir.join(STORE_FILE);
    // `try_exists`: a data dir this user cannot read is said as such, never
    // taken for "not a data dir".
    let ca_path = crate::ca::ca_certificate_path(data_dir);
    let has_ca = ca_path
        .try_exists()
        .map_err(|source| BackupError::Unreadable(describe_io_error(&ca_path, &source)))?;
    if !has_ca {
        return Err(BackupError::NotADataDir(data_dir.to_owned()));
    }
    let database: Box<dyn DatabasePart> = match postgres_of(data_dir) {
        Some(postgres) => Box::new(postgres),
        None if store.exists() => Box::new(SqliteSnapshot { store }),
        None => return Err(BackupError::NotADataDir(data_dir.to_owned())),
    };
    let private = PrivateDir::next_to(out)?;
    let partial = private.0.join("archive.partial");
    let manifest = write_archive(
        data_dir,
        database.as_ref(),
        recipients,
        &private.0,
        &partial,
        now,
    )?;
    fs::rename(&partial, out).map_err(io_error(out))?;
    Ok(BackupSummary {
        archive: out.to_owned(),
        manifest,
    })
}

/// `VACUUM INTO`: one consistent snapshot of a live SQLite database.
fn snapshot_store(store: &Path, snapshot: &Path) -> Result<(), BackupError> {
    let snapshot_error = |source| BackupError::Snapshot {
        path: store.to_owned(),
        source,
    };
    let connection = rusqlite::Connection::open_with_flags(
        store,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(snapshot_error)?;
    connection
        .busy_timeout(std::time::Duration::from_secs(30))
        .map_err(snapshot_error)?;
    connection
        .execute("VACUUM INTO ?1", [snapshot.to_string_lossy().as_ref()])
        .map_err(snapshot_error)?;
    Ok(())
}

fn write_archive(
    data_dir: &Path,
    database: &dyn DatabasePart,
    recipients: &[age::x25519::Recipient],
    private_dir: &Path,
    partial: &Path,
    now: i64,
) -> Result<BackupManifest, BackupError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(partial)
        .map_err(io_error(partial))?;
    let encryptor = age::Encryptor::with_recipients(
        recipients
            .iter()
            .map(|recipient| recipient as &dyn age::Recipient),
    )
    .map_err(|error| BackupError::Encrypt(error.to_string()))?;
    let encrypted = encryptor.wrap_output(file).map_err(io_error(partial))?;
    let encoder = zstd::Encoder::new(encrypted, 3).map_err(io_error(partial))?;
    let mut archive = ArchiveWriter {
        builder: tar::Builder::new(encoder),
        files: Vec::new(),
        mtime: u64::try_from(now).unwrap_or(0),
        path: partial.to_owned(),
    };
    database.add_to(&mut archive, private_dir)?;
    for root in INCLUDED {
        for relative in files_under(data_dir, root)? {
            if EXCLUDED.contains(&relative.as_str()) {
                continue;
            }
            let source = data_dir.join(&relative);
            let mode = fs::metadata(&source)
                .map_err(io_error(&source))?
                .permissions()
                .mode()
                & 0o777;
            archive.append_file(&relative, &source, mode)?;
        }
    }
    archive.finish(now)
}

/// A relative path made only of plain names, or `None`.
fn safe_relative_path(name: &Path) -> Option<PathBuf> {
    let mut clean = PathBuf::new();
    for component in name.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!clean.as_os_str().is_empty()).then_some(clean)
}

/// What a restore found in the archive, checked against its manifest (pure).
pub fn verify_against_manifest(
    manifest: &BackupManifest,
    found: &BTreeMap<String, (u64, String)>,
) -> Result<(), BackupError> {
    if manifest.format != BACKUP_FORMAT {
        return Err(BackupError::Manifest(format!(
            "format {:?}, expected {BACKUP_FORMAT:?}",
            manifest.format
        )));
    }
    for entry in &manifest.files {
        let Some((size, sha256)) = found.get(&entry.path) else {
            return Err(BackupError::Missing(entry.path.clone()));
        };
        if *size != entry.size {
            return Err(BackupError::Size {
                path: entry.path.clone(),
                expected: entry.size,
                actual: *size,
            });
        }
        if *sha256 != entry.sha256 {
            return Err(BackupError::Checksum {
                path: entry.path.clone(),
                expected: entry.sha256.clone(),
                actual: sha256.clone(),
            });
        }
    }
    if let Some(extra) = found
        .keys()
        .find(|path| !manifest.files.iter().any(|entry| &entry.path == *path))
    {
        return Err(BackupError::Unlisted(extra.clone()));
    }
    // Every backup holds its store: a SQLite file or a PostgreSQL dump.
    if !manifest
        .files
        .iter()
        .any(|entry| entry.path == STORE_FILE || entry.path == POSTGRES_DUMP_FILE)
    {
        return Err(BackupError::Missing(STORE_FILE.to_owned()));
    }
    Ok(())
}

/// What a finished restore wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSummary {
    pub data_dir: PathBuf,
    pub manifest: BackupManifest,
}

/// Where a backup of a PostgreSQL data dir is restored: an empty database.
#[derive(Debug, Clone)]
pub struct RestoreDatabase {
    /// `postgres://user@host:port/database` (no password).
    pub url: String,
    /// A file holding its password, kept next to the settings.
    pub password_file: Option<PathBuf>,
}

/// Rebuilds a data dir at `data_dir` (missing or empty) from `archive`,
/// decrypted with the identities of `identity_file`; a PostgreSQL dump in it
/// is restored into `database` (and the settings point there). On any
/// problem, what was written is removed and the error names the cause.
pub fn restore(
    archive: &Path,
    identity_file: &Path,
    data_dir: &Path,
    database: Option<&RestoreDatabase>,
) -> Result<RestoreSummary, BackupError> {
    let identities = identities(identity_file)?;
    match fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::TargetNotEmpty(data_dir.to_owned()));
            }
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error(data_dir)(error)),
    }
    flotte_proto::files::create_private_dir(data_dir).map_err(io_error(data_dir))?;
    let result = unpack_and_verify(archive, identity_file, &identities, data_dir)
        .and_then(|manifest| restore_database(data_dir, database).map(|()| manifest));
    if result.is_err() {
        // The target was missing or empty: everything in it is ours.
        if let Ok(entries) = fs::read_dir(data_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let _ = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
            }
        }
    }
    result.map(|manifest| RestoreSummary {
        data_dir: data_dir.to_owned(),
        manifest,
    })
}

/// Passes the decrypted bytes on, remembering an authentication failure:
/// `tar` reports read errors without their cause, and this one must be
/// named as what it is.
struct Authenticated<R> {
    inner: R,
    failure: std::rc::Rc<std::cell::RefCell<Option<String>>>,
}

impl<R: Read> Read for Authenticated<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buffer).inspect_err(|error| {
            *self.failure.borrow_mut() = Some(error.to_string());
        })
    }
}

fn unpack_and_verify(
    archive: &Path,
    identity_file: &Path,
    identities: &[age::x25519::Identity],
    data_dir: &Path,
) -> Result<BackupManifest, BackupError> {
    let file = io::BufReader::new(fs::File::open(archive).map_err(io_error(archive))?);
    let decrypt_error = |error: age::DecryptError| match error {
        age::DecryptError::NoMatchingKeys => BackupError::Decrypt {
            identity: identity_file.to_owned(),
            reason: "the backup was not encrypted to it".into(),
        },
        age::DecryptError::InvalidHeader
        | age::DecryptError::InvalidMac
        | age::DecryptError::DecryptionFailed => BackupError::Tampered(error.to_string()),
        other => BackupError::Decrypt {
            identity: identity_file.to_owned(),
            reason: other.to_string(),
        },
    };
    let decryptor = age::Decryptor::new(file).map_err(decrypt_error)?;
    let decrypted = decryptor
        .decrypt(
            identities
                .iter()
                .map(|identity| identity as &dyn age::Identity),
        )
        .map_err(decrypt_error)?;
    let failure = std::rc::Rc::new(std::cell::RefCell::new(None));
    let authenticated = Authenticated {
        inner: decrypted,
        failure: std::rc::Rc::clone(&failure),
    };
    let outcome = unpack_entries(authenticated, archive, data_dir);
    if let Some(reason) = failure.borrow_mut().take() {
        return Err(BackupError::Tampered(reason));
    }
    let manifest = outcome?;
    if !data_dir.join(POSTGRES_DUMP_FILE).exists() {
        check_store_integrity(&data_dir.join(STORE_FILE))?;
    }
    Ok(manifest)
}

/// Feeds an unpacked PostgreSQL dump to `pg_restore` into `database` and
/// points the settings there; checks that a SQLite backup was not given one.
fn restore_database(
    data_dir: &Path,
    database: Option<&RestoreDatabase>,
) -> Result<(), BackupError> {
    let dump = data_dir.join(POSTGRES_DUMP_FILE);
    let database = match (dump.exists(), database) {
        (false, None) => return Ok(()),
        (false, Some(_)) => return Err(BackupError::NoDatabaseInBackup),
        (true, None) => return Err(BackupError::NeedsDatabase),
        (true, Some(database)) => database,
    };
    let database_argument = format!("--dbname={}", database.url);
    run_postgres_tool(
        "pg_restore",
        &[
            "--no-owner".as_ref(),
            "--exit-on-error".as_ref(),
            "--single-transaction".as_ref(),
            database_argument.as_ref(),
            dump.as_os_str(),
        ],
        database.password_file.as_deref(),
    )?;
    fs::remove_file(&dump).map_err(io_error(&dump))?;
    let settings_path = crate::config::default_config_path(data_dir);
    let mut settings = crate::config::read_toml::<crate::config::ServerConfigFile>(&settings_path)
        .map_err(|error| BackupError::Manifest(format!("server.toml: {error}")))?;
    settings.store.url = Some(database.url.clone());
    settings.store.password_file = database.password_file.clone();
    let text =
        toml::to_string(&settings).map_err(|error| BackupError::Manifest(error.to_string()))?;
    flotte_proto::files::write_atomically(&settings_path, text.as_bytes())
        .map_err(io_error(&settings_path))
}

fn unpack_entries(
    decrypted: impl Read,
    archive: &Path,
    data_dir: &Path,
) -> Result<BackupManifest, BackupError> {
    let decoder = zstd::Decoder::new(decrypted).map_err(io_error(archive))?;
    let mut tar = tar::Archive::new(decoder);
    let mut found: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut manifest: Option<BackupManifest> = None;
    for entry in tar.entries().map_err(io_error(archive))? {
        let mut entry = entry.map_err(io_error(archive))?;
        let raw_name = entry.path().map_err(io_error(archive))?.into_owned();
        let shown = raw_name.display().to_string();
        let relative =
            safe_relative_path(&raw_name).ok_or_else(|| BackupError::UnsafeEntry(shown.clone()))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(BackupError::UnsafeEntry(shown));
        }
        let name = relative.to_string_lossy().into_owned();
        if name == MANIFEST_NAME {
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_MANIFEST_BYTES)
                .read_to_end(&mut bytes)
                .map_err(io_error(archive))?;
            manifest = Some(
                serde_json::from_slice(&bytes)
                    .map_err(|error| BackupError::Manifest(error.to_string()))?,
            );
            continue;
        }
        if found.contains_key(&name) {
            return Err(BackupError::UnsafeEntry(format!("{shown} (twice)")));
        }
        let target = data_dir.join(&relative);
        if let Some(parent) = target.parent() {
            flotte_proto::files::create_private_dir(parent).map_err(io_error(parent))?;
        }
        let mode = entry.header().mode().map_err(io_error(archive))? & 0o777;
        let mut output = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&target)
            .map_err(io_error(&target))?;
        let mut hashing = HashingReader::new(&mut entry);
        io::copy(&mut hashing, &mut output).map_err(io_error(&target))?;
        output.sync_all().map_err(io_error(&target))?;
        found.insert(name, hashing.finish());
    }
    let manifest =
        manifest.ok_or_else(|| BackupError::Manifest("manifest.json is missing".into()))?;
    verify_against_manifest(&manifest, &found)?;
    Ok(manifest)
}

fn check_store_integrity(store: &Path) -> Result<(), BackupError> {
    let integrity_error = |error: rusqlite::Error| BackupError::Integrity(error.to_string());
    let connection = rusqlite::Connection::open(store).map_err(integrity_error)?;
    let verdict: String = connection
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .map_err(integrity_error)?;
    if verdict == "ok" {
        Ok(())
    } else {
        Err(BackupError::Integrity(verdict))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::store::{SqliteStore, Store};
    use std::io::Write;

    fn write_test_file(root: &Path, relative: &str, bytes: &[u8], mode: u32) {
        let path = root.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .unwrap();
        file.write_all(bytes).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("flotte-backup-{name}-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    async fn sample_data_dir() -> PathBuf {
        let dir = temp_dir("source");
        write_test_file(&dir, "ca/ca.pem", b"CA CERT", 0o644);
        write_test_file(&dir, "ca/ca.key", b"CA KEY", 0o600);
        write_test_file(&dir, "server.toml", b"listen = \"127.0.0.1:0\"\n", 0o644);
        write_test_file(&dir, "images/blobs/abc", b"blob bytes", 0o644);
        write_test_file(&dir, "images/incoming/partial", b"half", 0o644);
        write_test_file(&dir, "server.address", b"127.0.0.1:1\n", 0o644);
        write_test_file(&dir, "forensics/m1/1-q1.tar", b"bundle", 0o644);
        write_test_file(&dir, "forensics/m1/2-q2.tar.partial", b"half", 0o644);
        write_test_file(&dir, "admin/cert.pem", b"ADMIN CERT", 0o644);
        write_test_file(&dir, "admin/key.pem", b"ADMIN KEY", 0o600);
        let store = SqliteStore::open(&dir.join(STORE_FILE)).unwrap();
        store
            .insert_release_key(&crate::store::ReleaseKeyRecord {
                id: "k1".into(),
                name: "release".into(),
                public_key_base64: "AAAA".into(),
                added_at: 1,
                added_by: "admin".into(),
            })
            .await
            .unwrap();
        dir
    }

    /// A fresh identity file and its recipients.
    fn backup_key(dir: &Path) -> (PathBuf, Vec<age::x25519::Recipient>) {
        let identity = dir.join(format!("identity-{}.txt", uuid::Uuid::new_v4()));
        let recipient = generate_backup_key(&identity).unwrap();
        assert_eq!(
            fs::metadata(&identity).unwrap().permissions().mode() & 0o777,
            0o600
        );
        (identity, recipients(&[recipient]).unwrap())
    }

    #[tokio::test]
    async fn a_backup_restores_the_store_and_files_with_their_modes() {
        let source = sample_data_dir().await;
        // The store stays open (as in a running server) during the backup.
        let _live = SqliteStore::open(&source.join(STORE_FILE)).unwrap();
        let out_dir = temp_dir("out");
        let out = out_dir.join("backup.flotte-backup");
        let (identity, recipients) = backup_key(&out_dir);
        let summary = backup(&source, &out, &recipients, 1000).unwrap();
        let names: Vec<&str> = summary
            .manifest
            .files
            .iter()
            .map(|file| file.path.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "flotte.db",
                "server.toml",
                "ca/ca.key",
                "ca/ca.pem",
                "admin/cert.pem",
                "images/blobs/abc",
                "forensics/m1/1-q1.tar"
            ]
        );
        assert_eq!(
            fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Only the archive and the identity are left next to it.
        assert_eq!(fs::read_dir(&out_dir).unwrap().count(), 2);

        let target = temp_dir("target").join("restored");
        // A SQLite backup has no database to restore elsewhere.
        let refused = restore(
            &out,
            &identity,
            &temp_dir("wrong-kind").join("r"),
            Some(&RestoreDatabase {
                url: "postgres://flotte@127.0.0.1:1/flotte".into(),
                password_file: None,
            }),
        )
        .unwrap_err();
        assert!(
            matches!(refused, BackupError::NoDatabaseInBackup),
            "{refused}"
        );
        restore(&out, &identity, &target, None).unwrap();
        assert!(!target.join("admin/key.pem").exists());
        assert_eq!(fs::read(target.join("ca/ca.key")).unwrap(), b"CA KEY");
        assert_eq!(
            fs::metadata(target.join("ca/ca.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(!target.join("images/incoming").exists());
        assert!(!target.join("server.address").exists());
        let restored = SqliteStore::open(&target.join(STORE_FILE)).unwrap();
        let keys = restored.release_keys().await.unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].id, "k1");
    }

    #[tokio::test]
    async fn a_backup_is_unreadable_without_its_identity() {
        let source = sample_data_dir().await;
        let out_dir = temp_dir("out");
        let out = out_dir.join("backup.flotte-backup");
        let (_identity, recipients) = backup_key(&out_dir);
        backup(&source, &out, &recipients, 1000).unwrap();
        let bytes = fs::read(&out).unwrap();
        assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
        assert!(zstd::decode_all(bytes.as_slice()).is_err());
        let (other_identity, _) = backup_key(&out_dir);
        let target = temp_dir("target").join("restored");
        let error = restore(&out, &other_identity, &target, None).unwrap_err();
        assert!(
            error.to_string().contains("was not encrypted to it"),
            "{error}"
        );
        assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
        let error = backup(&source, &out, &[], 1000).unwrap_err();
        assert!(error.to_string().contains("cannot encrypt"), "{error}");
        let error = super::recipients(&["age1notakey".to_owned()]).unwrap_err();
        assert!(
            error.to_string().contains("not an age X25519 recipient"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_byte_changed_anywhere_makes_restore_refuse_and_leave_nothing() {
        let source = sample_data_dir().await;
        let out_dir = temp_dir("out");
        let out = out_dir.join("backup.flotte-backup");
        let (identity, recipients) = backup_key(&out_dir);
        backup(&source, &out, &recipients, 1000).unwrap();
        let error = restore(&out, &identity, &source, None).unwrap_err();
        assert!(matches!(error, BackupError::TargetNotEmpty(_)), "{error}");

        let original = fs::read(&out).unwrap();
        // In the header (a recipient stanza or its MAC), in the payload, and
        // the last byte (the final chunk's tag).
        for position in [40, original.len() / 2, original.len() - 1] {
            let mut changed = original.clone();
            changed[position] ^= 0x01;
            let tampered = out_dir.join(format!("tampered-{position}"));
            fs::write(&tampered, &changed).unwrap();
            let target = temp_dir("target").join("restored");
            let error = restore(&tampered, &identity, &target, None).unwrap_err();
            assert!(
                matches!(
                    error,
                    BackupError::Tampered(_) | BackupError::Decrypt { .. }
                ),
                "byte {position}: {error}"
            );
            assert_eq!(
                fs::read_dir(&target).unwrap().count(),
                0,
                "byte {position}: nothing left behind"
            );
        }
        let mut cut = original.clone();
        cut.truncate(original.len() - 100);
        let truncated = out_dir.join("truncated");
        fs::write(&truncated, &cut).unwrap();
        let error =
            restore(&truncated, &identity, &temp_dir("target").join("r"), None).unwrap_err();
        assert!(matches!(error, BackupError::Tampered(_)), "{error}");
    }

    #[tokio::test]
    async fn a_reencrypted_archive_whose_manifest_disagrees_is_refused() {
        // Whoever holds the (public) recipient can build a whole archive;
        // the manifest still catches one that does not match its files.
        let source = sample_data_dir().await;
        let out_dir = temp_dir("out");
        let out = out_dir.join("backup.flotte-backup");
        let (identity, recipients) = backup_key(&out_dir);
        backup(&source, &out, &recipients, 1000).unwrap();
        let identities = identities(&identity).unwrap();
        let decrypted = age::Decryptor::new(io::BufReader::new(fs::File::open(&out).unwrap()))
            .unwrap()
            .decrypt(
                identities
                    .iter()
                    .map(|identity| identity as &dyn age::Identity),
            )
            .unwrap();
        let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
        for entry in tar::Archive::new(zstd::Decoder::new(decrypted).unwrap())
            .entries()
            .unwrap()
        {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            if name == "ca/ca.key" {
                bytes = b"EVILKY".to_vec();
            }
            entries.push((name, bytes));
        }
        let tampered = out_dir.join("reencrypted");
        let encrypted = age::Encryptor::with_recipients(
            recipients
                .iter()
                .map(|recipient| recipient as &dyn age::Recipient),
        )
        .unwrap()
        .wrap_output(fs::File::create(&tampered).unwrap())
        .unwrap();
        let mut builder = tar::Builder::new(zstd::Encoder::new(encrypted, 1).unwrap());
        for (name, bytes) in &entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o600);
            builder
                .append_data(&mut header, name, bytes.as_slice())
                .unwrap();
        }
        builder
            .into_inner()
            .unwrap()
            .finish()
            .unwrap()
            .finish()
            .unwrap();
        let target = temp_dir("target").join("restored");
        let error = restore(&tampered, &identity, &target, None).unwrap_err();
        assert!(
            matches!(&error, BackupError::Checksum { path, .. } if path == "ca/ca.key"),
            "{error}"
        );
        assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
    }

    #[test]
    fn a_data_dir_on_an_unreachable_postgresql_fails_naming_pg_dump_and_writes_nothing() {
        let dir = temp_dir("on-postgres");
        write_test_file(&dir, "ca/ca.pem", b"CA CERT", 0o644);
        // Port 1 on loopback: nothing listens, the dump cannot be taken.
        write_test_file(
            &dir,
            "server.toml",
            b"[store]\nkind = \"postgres\"\nurl = \"postgres://flotte@127.0.0.1:1/flotte\"\n",
            0o644,
        );
        let (_, recipients) = backup_key(&dir);
        let error = backup(&dir, &dir.join("out.tar"), &recipients, 1).unwrap_err();
        assert!(
            matches!(
                error,
                BackupError::PostgresTool {
                    tool: "pg_dump",
                    ..
                }
            ),
            "{error}"
        );
        assert!(!dir.join("out.tar").exists());
        // Without the setting it is simply not a data dir.
        write_test_file(&dir, "server.toml", b"", 0o644);
        let error = backup(&dir, &dir.join("out.tar"), &recipients, 1).unwrap_err();
        assert!(matches!(error, BackupError::NotADataDir(_)), "{error}");
    }

    #[test]
    fn only_plain_relative_paths_are_accepted() {
        assert_eq!(
            safe_relative_path(Path::new("ca/ca.pem")),
            Some(PathBuf::from("ca/ca.pem"))
        );
        for bad in ["../etc/passwd", "/etc/passwd", "ca/../../x", ""] {
            assert_eq!(safe_relative_path(Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn the_manifest_check_names_what_is_missing_extra_or_changed() {
        let entry = |path: &str, sha: &str| BackupFileEntry {
            path: path.into(),
            size: 1,
            sha256: sha.into(),
            mode: 0o600,
        };
        let manifest = BackupManifest {
            format: BACKUP_FORMAT.into(),
            created_at: 0,
            files: vec![entry("flotte.db", "aa"), entry("ca/ca.key", "bb")],
        };
        let found = |items: &[(&str, u64, &str)]| -> BTreeMap<String, (u64, String)> {
            items
                .iter()
                .map(|(path, size, sha)| ((*path).to_owned(), (*size, (*sha).to_owned())))
                .collect()
        };
        type Found = BTreeMap<String, (u64, String)>;
        let cases: Vec<(Found, &str)> = vec![
            (
                found(&[("flotte.db", 1, "aa"), ("ca/ca.key", 1, "bb")]),
                "ok",
            ),
            (found(&[("flotte.db", 1, "aa")]), "missing"),
            (
                found(&[
                    ("flotte.db", 1, "aa"),
                    ("ca/ca.key", 1, "bb"),
                    ("x", 1, "cc"),
                ]),
                "not in the manifest",
            ),
            (
                found(&[("flotte.db", 1, "aa"), ("ca/ca.key", 1, "zz")]),
                "checksum",
            ),
            (
                found(&[("flotte.db", 2, "aa"), ("ca/ca.key", 1, "bb")]),
                "size",
            ),
        ];
        for (found, expected) in cases {
            let outcome = verify_against_manifest(&manifest, &found);
            match expected {
                "ok" => assert!(outcome.is_ok(), "{outcome:?}"),
                text => {
                    let error = outcome.unwrap_err().to_string();
                    assert!(error.contains(text), "{error} lacks {text}");
                }
            }
        }
        let other_format = BackupManifest {
            format: "other/9".into(),
            ..manifest
        };
        assert!(verify_against_manifest(&other_format, &BTreeMap::new()).is_err());
    }
}
