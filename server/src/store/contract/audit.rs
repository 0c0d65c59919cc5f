//! The audit log: one hash chain, however many appends race.

use std::collections::BTreeSet;

use super::{audit_event, race, ContractBackend};
use flotte_common::audit::{verify_chain, AuditFilter};

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
        })
        .await
        .unwrap();
    assert_eq!(
        filtered.iter().map(|entry| entry.seq).collect::<Vec<_>>(),
        vec![3]
    );
}
