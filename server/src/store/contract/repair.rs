//! Quarantines and remediation events, and one quarantine (or release) per
//! machine whoever asks at once.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::{insert_machines, race, ContractBackend};
use crate::store::repair::{
    QuarantineOutcome, QuarantineRecord, ReleaseOutcome, RemediationEventRecord, RemediationState,
};

fn quarantine(machine_id: Uuid, id: &str) -> QuarantineRecord {
    QuarantineRecord {
        machine_id,
        id: id.into(),
        reason: format!("disk errors ({id})"),
        since: 10,
        by: "bob".into(),
    }
}

fn event(id: &str, machine_id: Uuid, opened_at: i64) -> RemediationEventRecord {
    RemediationEventRecord {
        id: id.into(),
        machine_id,
        hostname: "web-1".into(),
        zone: "dc1".into(),
        labels: BTreeMap::new(),
        provider: "local".into(),
        state: RemediationState::Requested,
        reason: "down".into(),
        opened_at,
        updated_at: opened_at,
        token_id: "tok".into(),
        replacement_machine_id: None,
        detail: String::new(),
    }
}

pub(crate) async fn quarantines_and_remediation_events_round_trip<B: ContractBackend>(store: B) {
    let id = insert_machines(&store, 1).await[0];
    let first = quarantine(id, "q1");
    let QuarantineOutcome::Quarantined(updated) = store.quarantine_machine(&first).await.unwrap()
    else {
        panic!("a machine in service is quarantined");
    };
    assert_eq!(updated.desired_version, 2, "the agent must be told");
    assert_eq!(store.quarantine(id).await.unwrap(), Some(first.clone()));
    assert_eq!(
        store
            .quarantine_machine(&quarantine(id, "q2"))
            .await
            .unwrap(),
        QuarantineOutcome::AlreadyQuarantined(first.clone()),
        "the first quarantine stands"
    );
    assert_eq!(
        store
            .quarantine_machine(&quarantine(Uuid::new_v4(), "q3"))
            .await
            .unwrap(),
        QuarantineOutcome::NoSuchMachine
    );
    let ReleaseOutcome::Released(released) = store.release_machine(id).await.unwrap() else {
        panic!("a quarantined machine is released");
    };
    assert_eq!(released.desired_version, 3);
    assert!(store.quarantines().await.unwrap().is_empty());
    assert_eq!(
        store.release_machine(id).await.unwrap(),
        ReleaseOutcome::NotQuarantined
    );
    assert_eq!(
        store.release_machine(Uuid::new_v4()).await.unwrap(),
        ReleaseOutcome::NoSuchMachine
    );

    // Opening a remediation quarantines and records together, as the
    // leader; a replica whose term ended writes nothing.
    let fence = store
        .try_lead("leader", std::time::Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let former = crate::store::replicas::Fence {
        holder: "former".into(),
        term: fence.term - 1,
    };
    let fenced = store
        .open_remediation(&first, &event("e0", id, 50), &former)
        .await;
    assert!(
        matches!(fenced, Err(crate::store::StoreError::Fenced { .. })),
        "{fenced:?}"
    );
    assert!(store.remediations().await.unwrap().is_empty());
    store
        .open_remediation(&first, &event("e1", id, 100), &fence)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.quarantines().await.unwrap(), vec![first.clone()]);
    store
        .open_remediation(&first, &event("e2", id, 200), &fence)
        .await
        .unwrap();
    let events = store.remediations().await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|event| event.id.as_str())
            .collect::<Vec<_>>(),
        ["e2", "e1"],
        "newest first"
    );
    // A provider's late answer never reopens a closed event.
    let closed = RemediationEventRecord {
        state: RemediationState::Closed,
        replacement_machine_id: Some(Uuid::new_v4()),
        ..event("e1", id, 100)
    };
    let fenced = store.update_remediation(&closed, &former).await;
    assert!(
        matches!(fenced, Err(crate::store::StoreError::Fenced { .. })),
        "{fenced:?}"
    );
    store.update_remediation(&closed, &fence).await.unwrap();
    assert!(!store
        .annotate_open_remediation("e1", "late", true, 300)
        .await
        .unwrap());
    assert!(store
        .annotate_open_remediation("e2", "quota exceeded", true, 300)
        .await
        .unwrap());
    let events = store.remediations().await.unwrap();
    assert_eq!(events[0].state, RemediationState::Failed);
    assert_eq!(events[0].detail, "quota exceeded");
    assert_eq!(events[1], closed);
}

pub(crate) async fn two_quarantines_at_once_quarantine_once<B: ContractBackend>(store: B) {
    let id = insert_machines(&store, 1).await[0];
    let outcomes = race(&store, 2, move |store, index| async move {
        store
            .quarantine_machine(&quarantine(id, &format!("q{index}")))
            .await
            .unwrap()
    })
    .await;
    let winner = match outcomes
        .iter()
        .position(|outcome| matches!(outcome, QuarantineOutcome::Quarantined(_)))
    {
        Some(winner) => winner,
        None => panic!("one quarantine must win: {outcomes:?}"),
    };
    let standing = quarantine(id, &format!("q{winner}"));
    assert_eq!(
        outcomes[1 - winner],
        QuarantineOutcome::AlreadyQuarantined(standing.clone())
    );
    assert_eq!(store.quarantines().await.unwrap(), vec![standing]);
    assert_eq!(
        store.machine(id).await.unwrap().unwrap().desired_version,
        2,
        "one change, one bump"
    );
}

pub(crate) async fn two_releases_at_once_release_once<B: ContractBackend>(store: B) {
    let id = insert_machines(&store, 1).await[0];
    store
        .quarantine_machine(&quarantine(id, "q1"))
        .await
        .unwrap();
    let outcomes = race(&store, 2, move |store, _| async move {
        store.release_machine(id).await.unwrap()
    })
    .await;
    let released = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, ReleaseOutcome::Released(_)))
        .count();
    assert_eq!(released, 1, "{outcomes:?}");
    assert!(outcomes.contains(&ReleaseOutcome::NotQuarantined));
    assert_eq!(store.machine(id).await.unwrap().unwrap().desired_version, 3);
}
