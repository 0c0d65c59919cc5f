//! `flotte-server admin-profile`: mints a new admin profile from the data
//! dir's CA key, for the day every admin's certificate is lost or expired.
//! Run on the server host (only it holds the CA key), possibly while the
//! server runs: the store is opened alongside it and the change is appended
//! to the audit log under the actor `flotte-server admin-profile`.
//!
//! What must never happen here: reviving a revoked operator (names are never
//! reused), turning a lesser operator into an admin silently, or writing over
//! an existing profile.

use std::path::{Path, PathBuf};

use flotte_common::audit::AuditEvent;
use flotte_common::profile::{Profile, ProfileError, ProfileSettings, PROFILE_FILE};
use flotte_common::roles::{AdminRpc, Role};
use flotte_proto::identity::{is_valid_segment, Identity, SEGMENT_GRAMMAR};

use crate::ca::{CaError, CertificateAuthority};
use crate::clock::{to_unix, Clock, SystemClock};
use crate::config::{default_config_path, read_toml, ConfigError, ServerConfigFile};
use crate::init::dial_address;
use crate::metrics::StoreMetrics;
use crate::store::settings::open_store;
use crate::store::{OperatorRecord, StoreError};

/// The actor recorded in the audit log for what this command does.
pub const ADMIN_PROFILE_ACTOR: &str = "flotte-server admin-profile";

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot use the CA of this data dir (the CA key is needed): {0}")]
    Ca(#[from] CaError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("operator name {name:?} {SEGMENT_GRAMMAR}")]
    InvalidName { name: String },
    #[error("{0} already holds a profile; choose another --out")]
    ProfileExists(PathBuf),
    #[error("operator {0} was revoked and names are never reused: choose another --name")]
    Revoked(String),
    #[error(
        "operator {name} is a {role}, not an admin: choose another --name to create a new admin"
    )]
    NotAnAdmin { name: String, role: Role },
}

/// What `admin-profile` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedProfile {
    pub name: String,
    /// True when a new admin operator was created (false: an existing
    /// admin was given a new certificate).
    pub created: bool,
    pub certificate_serial: String,
    pub profile: PathBuf,
}

/// Mints a new certificate and key for the admin `name` (creating it as an
/// admin if it does not exist) and writes a complete profile into `out`.
pub async fn mint_admin_profile(
    data_dir: &Path,
    out: &Path,
    name: &str,
) -> Result<MintedProfile, RecoveryError> {
    if !is_valid_segment(name) {
        return Err(RecoveryError::InvalidName {
            name: name.chars().take(64).collect(),
        });
    }
    if out.join(PROFILE_FILE).exists() {
        return Err(RecoveryError::ProfileExists(out.to_owned()));
    }
    let settings = read_toml::<ServerConfigFile>(&default_config_path(data_dir))?;
    let config = settings.validate(data_dir.to_owned())?;
    let ca = CertificateAuthority::load(data_dir)?;
    let store = open_store(&config.store, data_dir, StoreMetrics::default())
        .await?
        .store;
    let existing = store.operator(name).await?;
    match &existing {
        Some(operator) if operator.revoked_at.is_some() => {
            return Err(RecoveryError::Revoked(name.to_owned()))
        }
        Some(operator) if operator.role != Role::Admin => {
            return Err(RecoveryError::NotAnAdmin {
                name: name.to_owned(),
                role: operator.role,
            })
        }
        _ => {}
    }
    let identity = Identity::operator(&config.trust_domain, name);
    let (certificate, key) =
        ca.issue_client_with_new_key(&identity, config.operator_certificate_ttl)?;
    let now = SystemClock.now_unix();
    let not_after = to_unix(certificate.not_after);
    let created = match existing {
        Some(_) => {
            store
                .record_operator_certificate(name, &certificate.serial_hex, not_after)
                .await?
                // Revoked between our read and this write: the revocation wins.
                .ok_or_else(|| RecoveryError::Revoked(name.to_owned()))?;
            false
        }
        None => {
            store
                .insert_operator(&OperatorRecord {
                    name: name.to_owned(),
                    role: Role::Admin,
                    created_at: now,
                    created_by: ADMIN_PROFILE_ACTOR.to_owned(),
                    certificate_serial: certificate.serial_hex.clone(),
                    certificate_not_after: not_after,
                    revoked_at: None,
                })
                .await?;
            true
        }
    };
    let rpc = if created {
        AdminRpc::CreateOperator
    } else {
        AdminRpc::RenewOperatorCertificate
    };
    store
        .append_audit(&AuditEvent {
            at: now,
            actor: ADMIN_PROFILE_ACTOR.to_owned(),
            role: Role::Admin.to_string(),
            action: rpc.policy().action.to_owned(),
            arguments_json: serde_json::json!({ "name": name, "role": Role::Admin.as_str() })
                .to_string(),
            result: format!("ok: certificate serial {}", certificate.serial_hex),
        })
        .await?;
    let server = config
        .advertise_address
        .clone()
        .unwrap_or_else(|| dial_address(config.listen));
    Profile {
        settings: ProfileSettings {
            server,
            identity: identity.uri(),
        },
        ca_pem: ca.certificate_pem().to_owned(),
        certificate_pem: certificate.certificate_pem,
        key_pem: key.serialize_pem(),
    }
    .write(out)?;
    Ok(MintedProfile {
        name: name.to_owned(),
        created,
        certificate_serial: certificate.serial_hex,
        profile: out.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::init::{init, InitOptions, FIRST_ADMIN};
    use crate::store::TemporaryDirectory;

    /// The settings and the store of an initialised data dir.
    async fn open_data_dir(
        data_dir: &Path,
    ) -> (
        crate::config::ServerConfig,
        std::sync::Arc<dyn crate::store::Store>,
    ) {
        let config = read_toml::<ServerConfigFile>(&default_config_path(data_dir))
            .unwrap()
            .validate(data_dir.to_owned())
            .unwrap();
        let store = open_store(&config.store, data_dir, StoreMetrics::default())
            .await
            .unwrap()
            .store;
        (config, store)
    }

    #[tokio::test]
    async fn the_admin_gets_a_new_certificate_a_new_admin_is_created_and_both_are_audited() {
        let root = TemporaryDirectory::new();
        let data_dir = root.0.join("data");
        init(&data_dir, InitOptions::default()).await.unwrap();

        let renewed = mint_admin_profile(&data_dir, &root.0.join("p1"), FIRST_ADMIN)
            .await
            .unwrap();
        assert!(!renewed.created);
        let created = mint_admin_profile(&data_dir, &root.0.join("p2"), "rescue")
            .await
            .unwrap();
        assert!(created.created);
        let again = mint_admin_profile(&data_dir, &root.0.join("p2"), "rescue").await;
        assert!(
            matches!(again, Err(RecoveryError::ProfileExists(_))),
            "{again:?}"
        );

        let (config, store) = open_data_dir(&data_dir).await;
        let admin = store.operator(FIRST_ADMIN).await.unwrap().unwrap();
        assert_eq!(admin.certificate_serial, renewed.certificate_serial);
        let rescue = store.operator("rescue").await.unwrap().unwrap();
        assert_eq!(rescue.role, Role::Admin);
        assert_eq!(rescue.created_by, ADMIN_PROFILE_ACTOR);
        let profile = Profile::load(&root.0.join("p2")).unwrap();
        assert_eq!(
            profile.settings.identity,
            Identity::operator(&config.trust_domain, "rescue").uri()
        );
        let audited: Vec<(String, String)> = store
            .audit_entries(&Default::default())
            .await
            .unwrap()
            .into_iter()
            .filter(|entry| entry.event.actor == ADMIN_PROFILE_ACTOR)
            .map(|entry| (entry.event.action, entry.event.result))
            .collect();
        assert_eq!(
            audited,
            [
                (
                    "operator.renew".to_owned(),
                    format!("ok: certificate serial {}", renewed.certificate_serial)
                ),
                (
                    "operator.create".to_owned(),
                    format!("ok: certificate serial {}", created.certificate_serial)
                ),
            ]
        );
    }

    #[tokio::test]
    async fn a_revoked_or_lesser_operator_is_never_made_an_admin_profile() {
        let root = TemporaryDirectory::new();
        let data_dir = root.0.join("data");
        init(&data_dir, InitOptions::default()).await.unwrap();
        mint_admin_profile(&data_dir, &root.0.join("p1"), "second")
            .await
            .unwrap();
        let (_, store) = open_data_dir(&data_dir).await;
        store
            .set_operator_role("second", Role::Viewer)
            .await
            .unwrap();
        let lesser = mint_admin_profile(&data_dir, &root.0.join("p2"), "second").await;
        assert!(
            matches!(lesser, Err(RecoveryError::NotAnAdmin { .. })),
            "{lesser:?}"
        );
        store.revoke_operator("second", 5, &[]).await.unwrap();
        let revoked = mint_admin_profile(&data_dir, &root.0.join("p3"), "second").await;
        assert!(
            matches!(revoked, Err(RecoveryError::Revoked(_))),
            "{revoked:?}"
        );
        assert!(!root.0.join("p2").exists() && !root.0.join("p3").exists());
        let bad = mint_admin_profile(&data_dir, &root.0.join("p4"), "../x").await;
        assert!(
            matches!(bad, Err(RecoveryError::InvalidName { .. })),
            "{bad:?}"
        );
    }
}
