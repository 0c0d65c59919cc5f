//! The image contract: the signed manifest every process agrees on, image
//! references (`name@version`), and manifest verification against trusted
//! release keys. Packing and unpacking payloads live with the tools that do
//! it (`flottectl image build`, the agent's unpacker).
//!
//! A manifest is verified byte for byte as signed: never re-serialised
//! before verification.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::checks::CheckDefinition;
use crate::release_keys::ReleasePublicKey;

pub const MANIFEST_FORMAT: u32 = 1;
/// Manifests larger than this are refused before parsing.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

/// The command the agent supervises for this image, relative to the image
/// root for its first word when that is a relative path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub command: Vec<String>,
    /// The service's whole environment (the agent's own is never passed on).
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Who the service runs as (the agent's `[service]` settings override
    /// both); absent from manifests that do not say, so that their bytes
    /// and signatures stay what they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub version: String,
    /// Lowercase hex SHA-256 of the payload (`payload.tar.zst`).
    pub payload_sha256: String,
    pub payload_size: u64,
    #[serde(default)]
    pub service: Option<ServiceSpec>,
    #[serde(default)]
    pub checks: Vec<CheckDefinition>,
    /// RFC 3339.
    pub created_at: String,
    /// Id (SHA-256 of the raw public key) of the key that signed it.
    pub signing_key: String,
    /// Paths inside the image (relative, e.g. `var`) that the service may
    /// change: left out of the agent's integrity verification, subtree and
    /// all. Omitted from the JSON when empty, so older manifests keep their
    /// exact bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mutable_paths: Vec<String>,
}

/// The most mutable paths a manifest may declare.
pub const MAX_MUTABLE_PATHS: usize = 64;

/// Whether `path` is a plain relative path inside an image: named
/// components only (no `.`, `..`, empty component, leading or trailing `/`).
pub fn is_image_relative_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 1024
        && !path.contains('\0')
        && path
            .split('/')
            .all(|component| !component.is_empty() && component != "." && component != "..")
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("image reference {0:?} is not name@version")]
    BadReference(String),
    #[error("manifest is larger than {MAX_MANIFEST_BYTES} bytes")]
    ManifestTooLarge,
    #[error("manifest is not valid: {0}")]
    BadManifest(String),
    #[error("manifest is signed by key {0}, which is not trusted here")]
    UnknownKey(String),
    #[error("manifest signature does not verify with key {0}")]
    BadSignature(String),
}

/// `name@version`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    pub name: String,
    pub version: semver::Version,
}

impl std::str::FromStr for ImageReference {
    type Err = ImageError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ImageError::BadReference(text.to_owned());
        let (name, version) = text.split_once('@').ok_or_else(bad)?;
        if !crate::identity::is_valid_segment(name) {
            return Err(bad());
        }
        Ok(ImageReference {
            name: name.to_owned(),
            version: semver::Version::parse(version).map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for ImageReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Manifest {
    /// Checks the fields every consumer relies on.
    pub fn validate(&self) -> Result<semver::Version, ImageError> {
        let bad = |reason: String| ImageError::BadManifest(reason);
        if self.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format {} is not {MANIFEST_FORMAT}",
                self.format
            )));
        }
        if !crate::identity::is_valid_segment(&self.name) {
            return Err(bad(format!("name {:?} is invalid", self.name)));
        }
        let version = semver::Version::parse(&self.version)
            .map_err(|error| bad(format!("version {:?}: {error}", self.version)))?;
        if !is_sha256_hex(&self.payload_sha256) {
            return Err(bad("payload_sha256 is not 64 hex digits".into()));
        }
        if let Some(service) = &self.service {
            if service.command.first().is_none_or(String::is_empty) {
                return Err(bad("service.command is empty".into()));
            }
        }
        if self.mutable_paths.len() > MAX_MUTABLE_PATHS {
            return Err(bad(format!(
                "{} mutable paths (at most {MAX_MUTABLE_PATHS})",
                self.mutable_paths.len()
            )));
        }
        if let Some(path) = self
            .mutable_paths
            .iter()
            .find(|path| !is_image_relative_path(path))
        {
            let prefix: String = path.chars().take(64).collect();
            return Err(bad(format!(
                "mutable path {prefix:?} is not a relative path of named components"
            )));
        }
        Ok(version)
    }

    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Verifies `signature` over the exact `manifest_json` bytes with the trusted
/// key the manifest names, then parses and validates it.
pub fn verify_manifest(
    manifest_json: &[u8],
    signature: &[u8],
    trusted: &[ReleasePublicKey],
) -> Result<Manifest, ImageError> {
    if manifest_json.len() > MAX_MANIFEST_BYTES {
        return Err(ImageError::ManifestTooLarge);
    }
    // The key id is read before verification only to pick the key; nothing
    // else of an unverified manifest is trusted.
    #[derive(Deserialize)]
    struct KeyOnly {
        signing_key: String,
    }
    let key_id = serde_json::from_slice::<KeyOnly>(manifest_json)
        .map_err(|error| ImageError::BadManifest(error.to_string()))?
        .signing_key;
    let key = trusted
        .iter()
        .find(|key| key.id() == key_id)
        .ok_or_else(|| ImageError::UnknownKey(key_id.clone()))?;
    if !key.verifies(manifest_json, signature) {
        return Err(ImageError::BadSignature(key_id));
    }
    let manifest: Manifest = serde_json::from_slice(manifest_json)
        .map_err(|error| ImageError::BadManifest(error.to_string()))?;
    manifest.validate()?;
    Ok(manifest)
}

/// Signs a manifest: returns the exact bytes and their signature.
pub fn sign_manifest(
    manifest: &Manifest,
    key: &ring::signature::Ed25519KeyPair,
) -> Result<(Vec<u8>, Vec<u8>), ImageError> {
    let json = serde_json::to_vec_pretty(manifest)
        .map_err(|error| ImageError::BadManifest(error.to_string()))?;
    let signature = key.sign(&json).as_ref().to_vec();
    Ok((json, signature))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release_keys::{generate_signing_key, signing_key_from_pem};

    fn manifest(signing_key: String) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "app".into(),
            version: "1.2.0".into(),
            payload_sha256: "a".repeat(64),
            payload_size: 10,
            service: None,
            checks: Vec::new(),
            created_at: "2026-11-26T00:00:00Z".into(),
            signing_key,
            mutable_paths: Vec::new(),
        }
    }

    #[test]
    fn mutable_paths_are_plain_relative_paths() {
        let cases = [
            ("var", true),
            ("var/lib/app", true),
            ("", false),
            ("/var", false),
            ("var/", false),
            ("var//lib", false),
            ("./var", false),
            ("var/../etc", false),
        ];
        for (path, valid) in cases {
            let mut declared = manifest("k".into());
            declared.mutable_paths = vec![path.to_owned()];
            assert_eq!(declared.validate().is_ok(), valid, "{path:?}");
        }
        let mut many = manifest("k".into());
        many.mutable_paths = (0..=MAX_MUTABLE_PATHS).map(|n| format!("d{n}")).collect();
        assert!(many.validate().is_err());
    }

    #[test]
    fn signed_manifests_verify_only_with_the_trusted_key_and_exact_bytes() {
        let (private_pem, public) = generate_signing_key().unwrap();
        let (pair, _) = signing_key_from_pem(&private_pem).unwrap();
        let (json, signature) = sign_manifest(&manifest(public.id()), &pair).unwrap();
        let verified = verify_manifest(&json, &signature, std::slice::from_ref(&public)).unwrap();
        assert_eq!(verified.version, "1.2.0");

        let (_, stranger) = generate_signing_key().unwrap();
        assert_eq!(
            verify_manifest(&json, &signature, &[stranger]),
            Err(ImageError::UnknownKey(public.id()))
        );
        let mut tampered = json.clone();
        let position = tampered.iter().position(|b| *b == b'1').unwrap();
        tampered[position] = b'9';
        assert_eq!(
            verify_manifest(&tampered, &signature, std::slice::from_ref(&public)),
            Err(ImageError::BadSignature(public.id()))
        );
    }

    #[test]
    fn references_and_manifest_fields_are_checked() {
        let reference: ImageReference = "app@1.4.2".parse().unwrap();
        assert_eq!(reference.to_string(), "app@1.4.2");
        for bad in ["app", "app@", "app@one", "a/b@1.0.0", "@1.0.0"] {
            assert!(bad.parse::<ImageReference>().is_err(), "{bad}");
        }
        let mut bad = manifest("k".into());
        bad.version = "latest".into();
        assert!(bad.validate().is_err());
        bad = manifest("k".into());
        bad.payload_sha256 = "xyz".into();
        assert!(bad.validate().is_err());
    }
}
