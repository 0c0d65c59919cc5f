//! Access for people: users, keys, grants, the policy version every change
//! bumps, and what each machine applied.

use uuid::Uuid;

use super::ContractBackend;
use crate::store::{
    FoundKeysRecord, GrantRecord, MachineAccessRecord, RefusedKeyRecord, StoreError, UserKeyRecord,
    UserRecord,
};

fn user(name: &str) -> UserRecord {
    UserRecord {
        name: name.into(),
        created_at: 1,
        created_by: "admin".into(),
        revoked_at: None,
    }
}

fn key(user: &str, fingerprint: &str) -> UserKeyRecord {
    UserKeyRecord {
        user: user.into(),
        fingerprint: fingerprint.into(),
        key_type: "ssh-ed25519".into(),
        public_key: format!("ssh-ed25519 {fingerprint}"),
        comment: String::new(),
        added_at: 2,
    }
}

fn grant(id: &str, user: &str) -> GrantRecord {
    GrantRecord {
        id: id.into(),
        user: user.into(),
        selector: "role=web".into(),
        login: user.into(),
        expires_at: None,
        created_at: 3,
        created_by: "admin".into(),
    }
}

pub(crate) async fn every_change_bumps_the_version_and_revoking_a_user_removes_everything<
    B: ContractBackend,
>(
    store: B,
) {
    assert_eq!(store.access_snapshot().await.unwrap().version, 0);
    assert_eq!(
        store
            .insert_user(&user("alice"), &[key("alice", "A")])
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        store.insert_user(&user("alice"), &[]).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(store.insert_user(&user("bob"), &[]).await.unwrap(), 2);
    assert_eq!(store.insert_user_key(&key("alice", "B")).await.unwrap(), 3);
    assert_eq!(store.insert_grant(&grant("g1", "alice")).await.unwrap(), 4);
    assert_eq!(store.insert_grant(&grant("g2", "bob")).await.unwrap(), 5);
    let (removed, version) = store.remove_user_key("alice", "B").await.unwrap().unwrap();
    assert_eq!((removed.fingerprint.as_str(), version), ("B", 6));
    assert!(store.remove_user_key("alice", "B").await.unwrap().is_none());

    let revocation = store.revoke_user("alice", 99).await.unwrap().unwrap();
    assert_eq!(
        (
            revocation.grants_removed,
            revocation.keys_removed,
            revocation.version
        ),
        (1, 1, 7)
    );
    assert_eq!(revocation.user.revoked_at, Some(99));
    let snapshot = store.access_snapshot().await.unwrap();
    assert_eq!(snapshot.version, 7);
    assert!(snapshot.keys.is_empty());
    assert_eq!(snapshot.grants.len(), 1);
    assert_eq!(snapshot.grants[0].user, "bob");
    assert!(store.revoke_user("nobody", 1).await.unwrap().is_none());

    let machine = Uuid::new_v4();
    let record = MachineAccessRecord {
        machine_id: machine,
        applied_version: 7,
        applied_at: 100,
        missing_logins: vec!["carol".into()],
        found: vec![
            FoundKeysRecord {
                login: "bob".into(),
                source: "/etc/flotte/authorized_keys/bob".into(),
                public_keys: vec!["ssh-ed25519 X".into()],
                not_read_reason: None,
            },
            FoundKeysRecord {
                login: "bob".into(),
                source: "/home/bob/.ssh/authorized_keys".into(),
                public_keys: Vec::new(),
                not_read_reason: Some("not read: is a FIFO, not a regular file".into()),
            },
        ],
        refused: vec![RefusedKeyRecord {
            login: "root".into(),
            user: "bob".into(),
            grant_id: "g-1".into(),
            key: "SHA256:abc".into(),
            reason: "root is never managed".into(),
        }],
    };
    store
        .record_machine_access(std::slice::from_ref(&record))
        .await
        .unwrap();
    let updated = MachineAccessRecord {
        applied_version: 8,
        refused: Vec::new(),
        ..record
    };
    store
        .record_machine_access(std::slice::from_ref(&updated))
        .await
        .unwrap();
    assert_eq!(store.machine_access().await.unwrap(), vec![updated]);
}
