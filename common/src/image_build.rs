//! `flottectl image build`: packs a directory into a signed `.flotte` file,
//! and reads one back for `image push`.
//!
//! A `.flotte` file is a plain tar of exactly three members:
//! `manifest.json` (the signed bytes), `manifest.sig` (the raw ed25519
//! signature) and `payload.tar.zst` (the tree, zstd-compressed, with
//! deterministic headers so the same tree gives the same digest).

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use flotte_proto::checks::CheckDefinition;
use flotte_proto::image::{
    sign_manifest, Manifest, ServiceSpec, MANIFEST_FORMAT, MAX_MANIFEST_BYTES,
};
use flotte_proto::release_keys::signing_key_from_pem;
use ring::digest;

const MANIFEST_MEMBER: &str = "manifest.json";
const SIGNATURE_MEMBER: &str = "manifest.sig";
const PAYLOAD_MEMBER: &str = "payload.tar.zst";
/// zstd level: fast enough that packing is never the slow part of a release.
const COMPRESSION_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("signing key: {0}")]
    Key(String),
    #[error("invalid image: {0}")]
    Invalid(String),
    #[error("{path} is not a .flotte image: {reason}")]
    NotAnImage { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the manifest says besides the payload's digest and size.
#[derive(Debug, Clone)]
pub struct SealOptions {
    pub name: String,
    pub version: String,
    pub key_pem: String,
    pub service: Option<Vec<String>>,
    pub checks: Vec<CheckDefinition>,
    /// Paths the service may change, left out of integrity verification.
    pub mutable_paths: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub directory: PathBuf,
    pub seal: SealOptions,
}

/// Packs `directory` (symlinks kept as links) into a zstd tar at `payload`.
fn pack_payload(directory: &Path, payload: &Path) -> Result<(), BuildError> {
    let file = std::fs::File::create(payload).map_err(io(payload))?;
    let encoder = zstd::Encoder::new(file, COMPRESSION_LEVEL).map_err(io(payload))?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Deterministic);
    builder
        .append_dir_all(".", directory)
        .map_err(io(directory))?;
    let encoder = builder.into_inner().map_err(io(payload))?;
    let mut file = encoder.finish().map_err(io(payload))?;
    file.flush().map_err(io(payload))
}

/// SHA-256 (lowercase hex) and size of a file.
fn sha256_of_file(payload: &Path) -> Result<(String, u64), BuildError> {
    let mut file = std::fs::File::open(payload).map_err(io(payload))?;
    let mut hasher = digest::Context::new(&digest::SHA256);
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(io(payload))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((hex::encode(hasher.finish()), size))
}

fn append_member(
    builder: &mut tar::Builder<std::fs::File>,
    name: &str,
    bytes: &[u8],
    output: &Path,
) -> Result<(), BuildError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, name, bytes)
        .map_err(io(output))
}

/// Builds and signs an image; returns its manifest.
pub fn build_image(options: &BuildOptions, output: &Path) -> Result<Manifest, BuildError> {
    if !options.directory.is_dir() {
        return Err(BuildError::NotADirectory(options.directory.clone()));
    }
    // Checked before packing so that a bad key fails fast, not after a long pack.
    signing_key_from_pem(&options.seal.key_pem)
        .map_err(|error| BuildError::Key(error.to_string()))?;
    let payload = output.with_extension("payload.tmp");
    let sealed = pack_payload(&options.directory, &payload)
        .and_then(|()| seal_payload(&payload, &options.seal, output));
    let removed = std::fs::remove_file(&payload).map_err(io(&payload));
    let manifest = sealed?;
    removed?;
    Ok(manifest)
}

/// Signs an already packed payload (a tar, zstd-compressed or not) into a
/// `.flotte` file at `output`; returns its manifest. `build_image` packs a
/// directory first; tests use this directly to ship payloads that no honest
/// build would produce, and check that agents refuse them.
pub fn seal_payload(
    payload: &Path,
    options: &SealOptions,
    output: &Path,
) -> Result<Manifest, BuildError> {
    let (key, public) = signing_key_from_pem(&options.key_pem)
        .map_err(|error| BuildError::Key(error.to_string()))?;
    let (payload_sha256, payload_size) = sha256_of_file(payload)?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: options.name.clone(),
        version: options.version.clone(),
        payload_sha256,
        payload_size,
        service: options.service.clone().map(|command| ServiceSpec {
            command,
            environment: Default::default(),
            user: None,
            group: None,
        }),
        checks: options.checks.clone(),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        signing_key: public.id(),
        mutable_paths: options.mutable_paths.clone(),
    };
    manifest
        .validate()
        .map_err(|error| BuildError::Invalid(error.to_string()))?;
    let (manifest_json, signature) =
        sign_manifest(&manifest, &key).map_err(|error| BuildError::Invalid(error.to_string()))?;
    let outer = std::fs::File::create(output).map_err(io(output))?;
    let mut builder = tar::Builder::new(outer);
    append_member(&mut builder, MANIFEST_MEMBER, &manifest_json, output)?;
    append_member(&mut builder, SIGNATURE_MEMBER, &signature, output)?;
    let mut payload_file = std::fs::File::open(payload).map_err(io(payload))?;
    let mut header = tar::Header::new_gnu();
    header.set_size(payload_size);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, PAYLOAD_MEMBER, &mut payload_file)
        .map_err(io(output))?;
    builder
        .into_inner()
        .and_then(|file| file.sync_all())
        .map_err(io(output))?;
    Ok(manifest)
}

/// A `.flotte` file: the signed manifest in memory, the payload located in the file.
#[derive(Debug, Clone)]
pub struct ImageFile {
    pub manifest_json: Vec<u8>,
    pub signature: Vec<u8>,
    pub payload_offset: u64,
    pub payload_size: u64,
}

pub fn read_image_file(path: &Path) -> Result<ImageFile, BuildError> {
    let not_image = |reason: String| BuildError::NotAnImage {
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut archive = tar::Archive::new(file);
    let mut manifest_json = None;
    let mut signature = None;
    let mut payload = None;
    for entry in archive
        .entries()
        .map_err(|error| not_image(error.to_string()))?
    {
        let mut entry = entry.map_err(|error| not_image(error.to_string()))?;
        let name = entry
            .path()
            .map_err(|error| not_image(error.to_string()))?
            .to_string_lossy()
            .into_owned();
        let size = entry
            .header()
            .size()
            .map_err(|error| not_image(error.to_string()))?;
        match name.as_str() {
            MANIFEST_MEMBER | SIGNATURE_MEMBER => {
                if size > MAX_MANIFEST_BYTES as u64 {
                    return Err(not_image(format!("{name} is too large")));
                }
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(io(path))?;
                if name == MANIFEST_MEMBER {
                    manifest_json = Some(bytes);
                } else {
                    signature = Some(bytes);
                }
            }
            PAYLOAD_MEMBER => payload = Some((entry.raw_file_position(), size)),
            other => return Err(not_image(format!("unexpected member {other:?}"))),
        }
    }
    let (payload_offset, payload_size) = payload.ok_or_else(|| not_image("no payload".into()))?;
    Ok(ImageFile {
        manifest_json: manifest_json.ok_or_else(|| not_image("no manifest".into()))?,
        signature: signature.ok_or_else(|| not_image("no signature".into()))?,
        payload_offset,
        payload_size,
    })
}

/// Opens the payload of an image file positioned at its first byte.
pub fn open_payload(
    path: &Path,
    image: &ImageFile,
) -> Result<std::io::Take<std::fs::File>, BuildError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    file.seek(std::io::SeekFrom::Start(image.payload_offset))
        .map_err(io(path))?;
    Ok(file.take(image.payload_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotte_proto::image::verify_manifest;
    use flotte_proto::release_keys::generate_signing_key;

    #[test]
    fn builds_a_signed_reproducible_image_and_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("flotte-build-{}", uuid::Uuid::new_v4()));
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/app"), "#!/bin/sh\necho hi\n").unwrap();
        std::os::unix::fs::symlink("bin/app", tree.join("run")).unwrap();
        let (key_pem, public) = generate_signing_key().unwrap();
        let options = BuildOptions {
            directory: tree.clone(),
            seal: SealOptions {
                name: "app".into(),
                version: "1.2.0".into(),
                key_pem,
                service: Some(vec!["bin/app".into()]),
                checks: Vec::new(),
                mutable_paths: Vec::new(),
            },
        };
        let first = build_image(&options, &dir.join("a.flotte")).unwrap();
        let second = build_image(&options, &dir.join("b.flotte")).unwrap();
        assert_eq!(
            first.payload_sha256, second.payload_sha256,
            "same tree, same digest"
        );
        let image = read_image_file(&dir.join("a.flotte")).unwrap();
        let manifest = verify_manifest(&image.manifest_json, &image.signature, &[public]).unwrap();
        assert_eq!(manifest.payload_size, image.payload_size);
        let mut payload = Vec::new();
        open_payload(&dir.join("a.flotte"), &image)
            .unwrap()
            .read_to_end(&mut payload)
            .unwrap();
        assert_eq!(
            hex::encode(digest::digest(&digest::SHA256, &payload)),
            manifest.payload_sha256
        );
        let mut bad = options.clone();
        bad.seal.version = "one".into();
        assert!(matches!(
            build_image(&bad, &dir.join("c.flotte")),
            Err(BuildError::Invalid(_))
        ));
        assert!(
            !dir.join("c.payload.tmp").exists(),
            "a failed build leaves no packed payload behind"
        );
        assert!(read_image_file(&tree.join("bin/app")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
