//! Machines: enrollment rows, certificates, labels, transitions, desired
//! images, batched last-seen times and retirement.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::{machine, ContractBackend};
use crate::store::{DeniedEntry, DeniedKind, DesiredImageRecord, Inventory, StateTransitionRecord};

pub(crate) async fn machines_round_trip_and_last_seen_batches<B: ContractBackend>(store: B) {
    let id = Uuid::new_v4();
    store.insert_machine(&machine(id, "web-1")).await.unwrap();
    let inventory = Inventory {
        hostname: "web-1".into(),
        os: "Debian 12".into(),
        kernel: "6.1.0".into(),
        arch: "x86_64".into(),
        agent_version: "0.1.0".into(),
        boot_time: 5,
    };
    store
        .record_inventory(id, &inventory, 1_700_000_300)
        .await
        .unwrap();
    let writes_before = store.write_count();
    store
        .record_last_seen(&[(id, 1_700_000_400)])
        .await
        .unwrap();
    store.record_last_seen(&[(id, 7)]).await.unwrap();
    assert_eq!(
        store.write_count(),
        writes_before + 2,
        "one write per batch"
    );
    store
        .record_certificate(id, "0a02", 1_800_000_000)
        .await
        .unwrap();
    let relabelled = store
        .update_labels(id, &[("role".to_owned(), "db".to_owned())].into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(relabelled.desired_version, 2);
    assert!(store
        .update_labels(Uuid::new_v4(), &BTreeMap::new())
        .await
        .unwrap()
        .is_none());
    let loaded = store.machine(id).await.unwrap().unwrap();
    assert_eq!(
        loaded.last_seen, 1_700_000_400,
        "last_seen never goes backwards"
    );
    assert_eq!(
        (
            loaded.certificate_serial.as_str(),
            loaded.previous_certificate_serial.as_str(),
            loaded.certificate_not_after
        ),
        ("0a02", "0a01", 1_800_000_000)
    );
    assert_eq!(loaded.labels["role"], "db");
    assert_eq!(loaded.inventory, inventory);
    assert_eq!(store.machines().await.unwrap(), vec![loaded]);
}

pub(crate) async fn transitions_desired_images_and_retirement<B: ContractBackend>(store: B) {
    let id = Uuid::new_v4();
    store.insert_machine(&machine(id, "web-1")).await.unwrap();
    for (at, from, to) in [
        (10, "unknown", "operational"),
        (20, "operational", "degraded"),
    ] {
        store
            .record_transition(&StateTransitionRecord {
                machine_id: id,
                at,
                from: from.into(),
                to: to.into(),
                reason: format!("to {to}"),
            })
            .await
            .unwrap();
    }
    let transitions = store.transitions(id, 10).await.unwrap();
    assert_eq!(
        transitions
            .iter()
            .map(|transition| transition.at)
            .collect::<Vec<_>>(),
        [20, 10],
        "newest first"
    );
    assert_eq!(store.transitions(id, 1).await.unwrap().len(), 1);
    let current = store.machine(id).await.unwrap().unwrap();
    assert_eq!(
        (
            current.state.as_str(),
            current.state_reason.as_str(),
            current.state_since
        ),
        ("degraded", "to degraded", 20)
    );

    let image = DesiredImageRecord {
        name: "app".into(),
        version: "2.0.0".into(),
        digest: "d2".into(),
        rollback: false,
    };
    let updated = store
        .set_desired_image(id, Some(&image))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (updated.desired_image, updated.desired_version),
        (Some(image), 2)
    );
    let cleared = store.set_desired_image(id, None).await.unwrap().unwrap();
    assert_eq!((cleared.desired_image, cleared.desired_version), (None, 3));
    assert!(store
        .set_desired_image(Uuid::new_v4(), None)
        .await
        .unwrap()
        .is_none());

    let denied = [DeniedEntry {
        kind: DeniedKind::Serial,
        value: "0a01".into(),
        reason: "machine web-1 was decommissioned".into(),
        denied_at: 30,
    }];
    let retired = store
        .retire_machine(id, 30, &denied)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retired.retired_at, Some(30));
    let again = store
        .retire_machine(id, 40, &denied)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.retired_at, Some(30), "the first retirement stands");
    assert_eq!(store.denied_entries().await.unwrap(), denied.to_vec());
    assert!(store
        .retire_machine(Uuid::new_v4(), 30, &denied)
        .await
        .unwrap()
        .is_none());
}
