//! Where operator profiles live and which one a command acts as, like
//! kubectl's contexts and tsh's profiles: named profiles under
//! `$XDG_CONFIG_HOME/flotte/profiles/NAME` (`~/.config/…` by default), a
//! current one recorded by `flottectl profile use`, and `--profile` /
//! `FLOTTE_PROFILE` naming either a profile or a directory.
//!
//! Only the choice of a directory lives here; what a profile holds and how
//! it is read and written is `flotte_common::profile`'s. Nothing here dials
//! the server.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Subcommand;
use flotte_common::profile::Profile;
use flotte_proto::files;
use flotte_proto::names::quoted_prefix;
use serde::Serialize;

use crate::error::CtlError;
use crate::output::{self, print_line, Output};

/// The file (in the flotte config directory) naming the current profile.
const CURRENT_PROFILE_FILE: &str = "current";

/// Longest profile name accepted: it becomes a directory name.
const MAX_PROFILE_NAME_BYTES: usize = 64;

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// List the named profiles (the current one marked with `*`).
    List,
    /// Make NAME the profile used when neither --profile nor
    /// FLOTTE_PROFILE is given.
    Use {
        /// A profile name, as `profile list` shows it.
        name: String,
    },
    /// Copy a profile directory (e.g. the one `flotte-server init` or
    /// `operator add` wrote) under NAME, and make it current if it is the
    /// first.
    Import {
        /// The profile directory to copy (ca.pem, cert.pem, key.pem,
        /// profile.toml).
        directory: PathBuf,
        /// The name to give it (letters, digits, `-`, `_`, `.`).
        #[arg(long)]
        name: String,
    },
}

/// The flotte configuration directory of this user:
/// `$XDG_CONFIG_HOME/flotte`, else `$HOME/.config/flotte`.
pub fn config_directory() -> Result<PathBuf, CtlError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|value| !value.is_empty()) {
        Some(config_home) => PathBuf::from(config_home),
        None => match std::env::var_os("HOME").filter(|value| !value.is_empty()) {
            Some(home) => PathBuf::from(home).join(".config"),
            None => {
                return Err(CtlError::Usage(
                    "neither XDG_CONFIG_HOME nor HOME is set: pass --profile DIR".into(),
                ))
            }
        },
    };
    Ok(base.join("flotte"))
}

fn profiles_directory(config: &Path) -> PathBuf {
    config.join("profiles")
}

/// Checks a profile name: it becomes a directory name, so one grammar,
/// bounded, and never a path.
pub fn validate_profile_name(name: &str) -> Result<(), CtlError> {
    let valid_characters = name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'));
    if name.is_empty()
        || name.len() > MAX_PROFILE_NAME_BYTES
        || !valid_characters
        || name.starts_with('.')
    {
        return Err(CtlError::Usage(format!(
            "profile name {}: use 1 to {MAX_PROFILE_NAME_BYTES} letters, digits, '-', '_' or '.', \
             not starting with '.'",
            quoted_prefix(name)
        )));
    }
    Ok(())
}

/// Whether a `--profile` value names a directory rather than a profile:
/// anything with a path separator, or an existing directory relative to the
/// working directory (as `--profile ./admin` or `--profile admin` from where
/// `flotte-server init` wrote it).
fn names_a_directory(value: &Path) -> bool {
    value.components().count() != 1 || value.is_absolute() || value.is_dir()
}

/// The profile directory a command acts as: `--profile` / `FLOTTE_PROFILE`
/// (a directory or a profile name), else the current named profile, else
/// the only one there is.
pub fn resolve_profile_directory(flag: Option<&Path>) -> Result<PathBuf, CtlError> {
    if let Some(value) = flag {
        if names_a_directory(value) {
            return Ok(value.to_owned());
        }
        let name = value.to_string_lossy();
        validate_profile_name(&name)?;
        let directory = profiles_directory(&config_directory()?).join(name.as_ref());
        if !directory.is_dir() {
            return Err(CtlError::Usage(format!(
                "no profile named {} (no directory {}, nor {} here): `flottectl profile list` \
                 shows the named ones",
                quoted_prefix(&name),
                directory.display(),
                quoted_prefix(&name)
            )));
        }
        return Ok(directory);
    }
    let config = config_directory()?;
    if let Some(name) = current_profile_name(&config)? {
        return Ok(profiles_directory(&config).join(name));
    }
    let names = profile_names(&config)?;
    match names.as_slice() {
        [only] => Ok(profiles_directory(&config).join(only)),
        [] => Err(CtlError::NoProfile),
        several => Err(CtlError::Usage(format!(
            "several profiles and none is current ({}): pass --profile NAME or run \
             `flottectl profile use NAME`",
            several.join(", ")
        ))),
    }
}

/// The name recorded as current, if it still names a profile.
fn current_profile_name(config: &Path) -> Result<Option<String>, CtlError> {
    let path = config.join(CURRENT_PROFILE_FILE);
    // Bounded: a name is short, whatever the file holds.
    let text = match std::fs::File::open(&path) {
        Ok(file) => {
            let mut text = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(file, MAX_PROFILE_NAME_BYTES as u64 + 2),
                &mut text,
            )
            .map_err(|source| CtlError::ReadFile {
                path: path.clone(),
                source,
            })?;
            text
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CtlError::ReadFile { path, source }),
    };
    let name = String::from_utf8_lossy(&text).trim().to_owned();
    validate_profile_name(&name).map_err(|_| {
        CtlError::Usage(format!(
            "{} does not hold a profile name: run `flottectl profile use NAME`",
            path.display()
        ))
    })?;
    if !profiles_directory(config).join(&name).is_dir() {
        return Err(CtlError::Usage(format!(
            "the current profile {name:?} (in {}) no longer exists: run `flottectl profile use \
             NAME`",
            path.display()
        )));
    }
    Ok(Some(name))
}

/// The named profiles, sorted.
fn profile_names(config: &Path) -> Result<Vec<String>, CtlError> {
    let directory = profiles_directory(config);
    let entries = match std::fs::read_dir(&directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CtlError::ReadFile {
                path: directory,
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CtlError::ReadFile {
            path: directory.clone(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && validate_profile_name(&name).is_ok() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn use_profile(config: &Path, name: &str) -> Result<(), CtlError> {
    validate_profile_name(name)?;
    if !profiles_directory(config).join(name).is_dir() {
        return Err(CtlError::Usage(format!(
            "no profile named {name:?}: `flottectl profile list` shows the named ones"
        )));
    }
    let path = config.join(CURRENT_PROFILE_FILE);
    files::write_atomically(&path, format!("{name}\n").as_bytes())
        .map_err(|source| CtlError::WriteFile { path, source })
}

/// Copies the profile in `source` under `name`; refuses to overwrite one.
fn import_profile(config: &Path, source: &Path, name: &str) -> Result<PathBuf, CtlError> {
    validate_profile_name(name)?;
    let profile = Profile::load(source)?;
    let profiles = profiles_directory(config);
    files::create_private_dir(config).map_err(|source| CtlError::WriteFile {
        path: config.to_owned(),
        source,
    })?;
    files::create_private_dir(&profiles).map_err(|source| CtlError::WriteFile {
        path: profiles.clone(),
        source,
    })?;
    let target = profiles.join(name);
    if target.exists() {
        return Err(CtlError::Usage(format!(
            "a profile named {name:?} exists already ({}): choose another --name",
            target.display()
        )));
    }
    profile.write(&target)?;
    let first = current_profile_name(config)?.is_none() && profile_names(config)?.len() == 1;
    if first {
        use_profile(config, name)?;
    }
    Ok(target)
}

#[derive(Debug, Serialize)]
struct ProfileRow {
    name: String,
    current: bool,
    server: String,
    directory: String,
    /// RFC 3339, or why the certificate could not be read.
    certificate_expires: String,
}

fn list_profiles(config: &Path) -> Result<Vec<ProfileRow>, CtlError> {
    let current = current_profile_name(config).ok().flatten();
    profile_names(config)?
        .into_iter()
        .map(|name| {
            let directory = profiles_directory(config).join(&name);
            let (server, certificate_expires) = match Profile::load(&directory) {
                Ok(profile) => (
                    profile.settings.server.clone(),
                    match profile.certificate_validity() {
                        Ok(validity) if validity.is_expired(SystemTime::now()) => format!(
                            "expired {}",
                            humantime::format_rfc3339_seconds(validity.not_after)
                        ),
                        Ok(validity) => {
                            humantime::format_rfc3339_seconds(validity.not_after).to_string()
                        }
                        Err(error) => format!("unreadable: {error}"),
                    },
                ),
                Err(error) => (String::new(), format!("unreadable: {error}")),
            };
            Ok(ProfileRow {
                current: current.as_deref() == Some(name.as_str()),
                name,
                server,
                directory: directory.display().to_string(),
                certificate_expires,
            })
        })
        .collect()
}

pub fn run(output: Output, command: &ProfileCommand) -> Result<(), CtlError> {
    let config = config_directory()?;
    match command {
        ProfileCommand::List => {
            let rows = list_profiles(&config)?;
            output::print_list(
                output,
                &rows,
                &["", "NAME", "SERVER", "EXPIRES", "DIRECTORY"],
                |row| {
                    vec![
                        if row.current { "*" } else { "" }.to_owned(),
                        row.name.clone(),
                        row.server.clone(),
                        row.certificate_expires.clone(),
                        row.directory.clone(),
                    ]
                },
            )?;
            if rows.is_empty() && output == Output::Table {
                print_line!(
                    "no named profiles in {}: `flottectl profile import DIR --name NAME` adds one",
                    profiles_directory(&config).display()
                );
            }
            Ok(())
        }
        ProfileCommand::Use { name } => {
            use_profile(&config, name)?;
            print_line!("current profile: {name}");
            Ok(())
        }
        ProfileCommand::Import { directory, name } => {
            let target = import_profile(&config, directory, name)?;
            let current = current_profile_name(&config)?;
            print_line!(
                "profile {name} imported into {}{}",
                target.display(),
                if current.as_deref() == Some(name.as_str()) {
                    " (current)"
                } else {
                    "; `flottectl profile use` makes it current"
                }
            );
            Ok(())
        }
    }
}
