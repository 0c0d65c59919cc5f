//! The audit log: one hash chain, however many appends race.

use std::collections::BTreeSet;

use super::{audit_event, race, ContractBackend};
use flotte_common::audit::{verify_chain, AuditFilter};
use flotte_common::audit_checkpoints::AuditCheckpoint;

pub(crate) async fn concurrent_appends_make_one_valid_chain<B: ContractBackend>(store: B) {
    let records = race(&store, 16, |store, index| async move {
        store
            .append_audit(&audit_event(100, &format!("op{index}"), "token.create"))
            .await
            .unwrap()
    })
    .await;
    let entries = store.audit_entries(&AuditFilter::default()).await.unwrap();
    assert_eq!(verify_chain(&entries).unwrap().entries, 16);
    assert_eq!(
        entries.iter().map(|entry| entry.seq).collect::<Vec<_>>(),
        (1..=16).collect::<Vec<u64>>()
    );
    let mut returned = records;
    returned.sort_by_key(|record| record.seq);
    assert_eq!(
        returned, entries,
        "each append returned the entry it sealed"
    );
    let actors: BTreeSet<&str> = entries
        .iter()
        .map(|entry| entry.event.actor.as_str())
        .collect();
    assert_eq!(actors.len(), 16);
}

pub(crate) async fn entries_filter_by_time_and_actor<B: ContractBackend>(store: B) {
    for (at, actor) in [(10, "admin"), (20, "bob"), (30, "admin")] {
        store
            .append_audit(&audit_event(at, actor, "token.create"))
            .await
            .unwrap();
    }
    let filtered = store
        .audit_entries(&AuditFilter {
            since: Some(15),
            actor: Some("admin".into()),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        filtered.iter().map(|entry| entry.seq).collect::<Vec<_>>(),
        vec![3]
    );
}

pub(crate) async fn entries_page_by_sequence_and_checkpoints_are_kept_once<B: ContractBackend>(
    store: B,
) {
    assert_eq!(store.audit_head().await.unwrap(), None);
    assert_eq!(store.latest_audit_checkpoint().await.unwrap(), None);
    for at in 1..=7 {
        store
            .append_audit(&audit_event(at, "admin", "token.create"))
            .await
            .unwrap();
    }
    let page = |after_seq, limit| AuditFilter {
        after_seq: Some(after_seq),
        limit: Some(limit),
        ..AuditFilter::default()
    };
    let seqs = |entries: Vec<flotte_common::audit::AuditRecord>| {
        entries.iter().map(|entry| entry.seq).collect::<Vec<_>>()
    };
    assert_eq!(
        seqs(store.audit_entries(&page(0, 3)).await.unwrap()),
        vec![1, 2, 3]
    );
    assert_eq!(
        seqs(store.audit_entries(&page(3, 3)).await.unwrap()),
        vec![4, 5, 6]
    );
    assert_eq!(
        seqs(store.audit_entries(&page(6, 3)).await.unwrap()),
        vec![7]
    );
    let entries = store.audit_entries(&AuditFilter::default()).await.unwrap();
    assert_eq!(
        store.audit_head().await.unwrap(),
        Some((7, entries[6].hash.clone()))
    );

    let checkpoint = |seq: u64, signature: &str| AuditCheckpoint {
        seq,
        head_hash: entries[seq as usize - 1].hash.clone(),
        at: 100 + seq as i64,
        key_id: "k".into(),
        signature: signature.into(),
    };
    for seq in [2, 5, 7] {
        store
            .insert_audit_checkpoint(&checkpoint(seq, "first"))
            .await
            .unwrap();
    }
    // Signing the same head again keeps the first.
    store
        .insert_audit_checkpoint(&checkpoint(5, "second"))
        .await
        .unwrap();
    assert_eq!(
        store.audit_checkpoints(2, Some(5)).await.unwrap(),
        vec![checkpoint(5, "first")]
    );
    assert_eq!(
        store
            .audit_checkpoints(0, None)
            .await
            .unwrap()
            .iter()
            .map(|checkpoint| checkpoint.seq)
            .collect::<Vec<_>>(),
        vec![2, 5, 7]
    );
    assert_eq!(
        store.latest_audit_checkpoint().await.unwrap(),
        Some(checkpoint(7, "first"))
    );
}
