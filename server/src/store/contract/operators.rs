//! Operators and the deny list, and the rule that at least one active admin
//! remains whatever concurrent revocations and demotions do.

use super::{operator, race, ContractBackend};
use crate::store::{DeniedEntry, DeniedKind, OperatorChange, StoreError};
use flotte_common::roles::Role;

fn denial(name: &str, at: i64) -> Vec<DeniedEntry> {
    vec![DeniedEntry {
        kind: DeniedKind::Identity,
        value: format!("spiffe://td/operator/{name}"),
        reason: format!("operator {name} was revoked"),
        denied_at: at,
    }]
}

pub(crate) async fn a_renewed_certificate_is_recorded_for_active_operators_only<
    B: ContractBackend,
>(
    store: B,
) {
    store
        .insert_operator(&operator("alice", Role::Admin))
        .await
        .unwrap();
    store
        .insert_operator(&operator("carol", Role::Viewer))
        .await
        .unwrap();
    let renewed = store
        .record_operator_certificate("carol", "0cnew", 1_900_000_000)
        .await
        .unwrap()
        .expect("an active operator's certificate is recorded");
    assert_eq!(renewed.certificate_serial, "0cnew");
    assert_eq!(renewed.certificate_not_after, 1_900_000_000);
    assert_eq!(renewed.role, Role::Viewer, "nothing else changes");
    assert_eq!(store.operator("carol").await.unwrap(), Some(renewed));

    store
        .revoke_operator("carol", 7, &denial("carol", 7))
        .await
        .unwrap();
    assert_eq!(
        store
            .record_operator_certificate("carol", "0clater", 2_000_000_000)
            .await
            .unwrap(),
        None,
        "a revoked operator gets no new certificate on record"
    );
    assert_eq!(
        store
            .operator("carol")
            .await
            .unwrap()
            .unwrap()
            .certificate_serial,
        "0cnew"
    );
    assert_eq!(
        store
            .record_operator_certificate("nobody", "0c", 1)
            .await
            .unwrap(),
        None
    );
}

pub(crate) async fn operators_and_the_deny_list_round_trip<B: ContractBackend>(store: B) {
    store
        .insert_operator(&operator("alice", Role::Admin))
        .await
        .unwrap();
    let bob = operator("bob", Role::Viewer);
    store.insert_operator(&bob).await.unwrap();
    assert!(matches!(
        store.insert_operator(&bob).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let promoted = store
        .set_operator_role("bob", Role::Operator)
        .await
        .unwrap();
    assert!(
        matches!(promoted, OperatorChange::Changed(ref record) if record.role == Role::Operator)
    );
    assert_eq!(
        store
            .set_operator_role("nobody", Role::Viewer)
            .await
            .unwrap(),
        OperatorChange::NotFound
    );
    let revoked = store
        .revoke_operator("bob", 5, &denial("bob", 5))
        .await
        .unwrap();
    assert!(matches!(revoked, OperatorChange::Changed(ref record) if record.revoked_at == Some(5)));
    let again = store
        .revoke_operator("bob", 9, &denial("bob", 9))
        .await
        .unwrap();
    assert!(
        matches!(again, OperatorChange::Changed(ref record) if record.revoked_at == Some(5)),
        "the first revocation stands"
    );
    assert_eq!(
        store
            .revoke_operator("nobody", 5, &denial("nobody", 5))
            .await
            .unwrap(),
        OperatorChange::NotFound
    );
    assert_eq!(store.denied_entries().await.unwrap(), denial("bob", 5));
    assert_eq!(
        store.operator("bob").await.unwrap().unwrap().revoked_at,
        Some(5)
    );
    let names: Vec<String> = store
        .operators()
        .await
        .unwrap()
        .into_iter()
        .map(|operator| operator.name)
        .collect();
    assert_eq!(names, ["alice", "bob"]);

    // The last admin stays an admin, and is not revoked.
    assert!(matches!(
        store.set_operator_role("alice", Role::Viewer).await.unwrap(),
        OperatorChange::LastAdmin(ref record) if record.name == "alice"
    ));
    assert!(matches!(
        store.set_operator_role("alice", Role::Admin).await.unwrap(),
        OperatorChange::Changed(_)
    ));
    assert!(matches!(
        store
            .revoke_operator("alice", 6, &denial("alice", 6))
            .await
            .unwrap(),
        OperatorChange::LastAdmin(_)
    ));
    assert_eq!(
        store.denied_entries().await.unwrap(),
        denial("bob", 5),
        "nothing written"
    );
}

/// The active admins left, by name.
async fn active_admins<B: ContractBackend>(store: &B) -> Vec<String> {
    store
        .operators()
        .await
        .unwrap()
        .into_iter()
        .filter(|operator| operator.role == Role::Admin && operator.revoked_at.is_none())
        .map(|operator| operator.name)
        .collect()
}

fn refused_and_changed(changes: &[OperatorChange]) -> (usize, usize) {
    let refused = changes
        .iter()
        .filter(|change| matches!(change, OperatorChange::LastAdmin(_)))
        .count();
    let changed = changes
        .iter()
        .filter(|change| matches!(change, OperatorChange::Changed(_)))
        .count();
    (refused, changed)
}

async fn insert_two_admins<B: ContractBackend>(store: &B) {
    for name in ["alice", "bob"] {
        store
            .insert_operator(&operator(name, Role::Admin))
            .await
            .unwrap();
    }
}

/// Rounds of the revocation race: a missing lock loses only some of them,
/// so one round would let it through most runs.
const REVOCATION_RACE_ROUNDS: usize = 12;

pub(crate) async fn two_admins_revoked_at_once_leave_one<B: ContractBackend>(store: B) {
    insert_two_admins(&store).await;
    let mut pair = ["alice".to_owned(), "bob".to_owned()];
    for round in 0..REVOCATION_RACE_ROUNDS {
        let names = pair.clone();
        let changes = race(&store, 2, move |store, index| {
            let name = names[index].clone();
            async move {
                store
                    .revoke_operator(&name, 10, &denial(&name, 10))
                    .await
                    .unwrap()
            }
        })
        .await;
        assert_eq!(
            refused_and_changed(&changes),
            (1, 1),
            "round {round}: {changes:?}"
        );
        let survivors = active_admins(&store).await;
        assert_eq!(survivors.len(), 1, "round {round}");
        let revoked = if survivors[0] == pair[0] {
            &pair[1]
        } else {
            &pair[0]
        };
        let denied = store.denied_entries().await.unwrap();
        assert!(
            denial(revoked, 10)
                .iter()
                .all(|entry| denied.contains(entry)),
            "round {round}: {revoked} was revoked but is not denied"
        );
        assert!(
            denial(&survivors[0], 10)
                .iter()
                .all(|entry| !denied.contains(entry)),
            "round {round}: the refused revocation denied something"
        );
        // The survivor and a newcomer race again.
        let newcomer = format!("admin-{round}");
        store
            .insert_operator(&operator(&newcomer, Role::Admin))
            .await
            .unwrap();
        pair = [survivors[0].clone(), newcomer];
    }
}

pub(crate) async fn two_admins_demoted_at_once_leave_one<B: ContractBackend>(store: B) {
    insert_two_admins(&store).await;
    let changes = race(&store, 2, |store, index| async move {
        let (name, role) = [("alice", Role::Viewer), ("bob", Role::Operator)][index];
        store.set_operator_role(name, role).await.unwrap()
    })
    .await;
    assert_eq!(refused_and_changed(&changes), (1, 1), "{changes:?}");
    assert_eq!(active_admins(&store).await.len(), 1);
}
