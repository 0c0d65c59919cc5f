//! The last image verification per machine: replaced, never accumulated,
//! refused for a machine that is not enrolled, and read back whole.

use uuid::Uuid;

use super::{insert_machines, ContractBackend};
use crate::store::integrity::{
    DifferenceCounts, DifferenceRecord, ImageVerificationRecord, VerificationDetails,
};

fn verification(machine_id: Uuid, request_id: &str, changed: u64) -> ImageVerificationRecord {
    ImageVerificationRecord {
        machine_id,
        received_at: 1_700_000_500,
        request_id: request_id.into(),
        result: if changed == 0 { "clean" } else { "drift" }.into(),
        started_at: 1_700_000_400,
        duration_ms: 1234,
        bytes_read: 5_000_000_000,
        details: VerificationDetails {
            image_name: "app".into(),
            image_version: "1.2.0".into(),
            image_digest: "a".repeat(64),
            entries_checked: 42,
            error: String::new(),
            counts: DifferenceCounts {
                changed,
                ..DifferenceCounts::default()
            },
            differences: (0..changed)
                .map(|index| DifferenceRecord {
                    path: format!("bin/tool-{index}"),
                    kind: "changed".into(),
                    detail: "sha256 aaa → bbb".into(),
                })
                .collect(),
            kept_tree: String::new(),
            restore_message: String::new(),
        },
    }
}

pub(crate) async fn a_machine_keeps_its_last_verification_only<B: ContractBackend>(store: B) {
    let machines = insert_machines(&store, 2).await;
    let first = verification(machines[0], "r1", 3);
    assert!(store.record_verification(&first).await.unwrap());
    let other = verification(machines[1], "", 0);
    assert!(store.record_verification(&other).await.unwrap());
    let mut expected = vec![first.clone(), other.clone()];
    expected.sort_by_key(|record| record.machine_id.to_string());
    assert_eq!(store.verifications().await.unwrap(), expected);

    let replaced = verification(machines[0], "r2", 0);
    assert!(store.record_verification(&replaced).await.unwrap());
    let mut expected = vec![replaced, other];
    expected.sort_by_key(|record| record.machine_id.to_string());
    assert_eq!(store.verifications().await.unwrap(), expected);

    let stranger = verification(Uuid::new_v4(), "r3", 1);
    assert!(!store.record_verification(&stranger).await.unwrap());
    assert_eq!(store.verifications().await.unwrap().len(), 2);
}
