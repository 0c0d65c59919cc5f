//! Replicas: optimistic rollout revisions, the leader lease with its
//! fencing term (raced), replica leases and session holders, and the
//! change feed.

use std::time::Duration;

use uuid::Uuid;

use super::{insert_machines, race, rollout, ContractBackend};
use crate::domain::rollout::RolloutState;
use crate::store::replicas::{FeedEvent, ReplicaRegistration};
use crate::store::StoreError;

const LEASE: Duration = Duration::from_secs(30);

pub(crate) async fn a_stale_rollout_write_is_refused_and_changes_nothing<B: ContractBackend>(
    store: B,
) {
    let created = rollout(Uuid::new_v4(), RolloutState::Running);
    store.insert_rollout(&created, &[]).await.unwrap();
    // Two replicas read revision 0; one pauses it, the other's pass follows.
    let mut paused = created.clone();
    paused.state = RolloutState::Paused;
    let mut passed = created.clone();
    passed.current_wave = 1;
    store
        .apply_rollout_pass(&paused, &[], &[], None)
        .await
        .unwrap();
    let refused = store.apply_rollout_pass(&passed, &[], &[], None).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    let stored = store.rollout(created.id).await.unwrap().unwrap();
    assert_eq!(stored.state, RolloutState::Paused);
    assert_eq!(stored.current_wave, 0);
    assert_eq!(stored.revision, 1);
    // Decided again on the stored row, it goes through.
    let mut again = stored.clone();
    again.current_wave = 1;
    store
        .apply_rollout_pass(&again, &[], &[], None)
        .await
        .unwrap();
    assert_eq!(
        store.rollout(created.id).await.unwrap().unwrap().revision,
        2
    );
}

pub(crate) async fn one_replica_leads_and_an_ended_term_is_fenced<B: ContractBackend>(store: B) {
    let first = store
        .try_lead("a", LEASE)
        .await
        .unwrap()
        .expect("a free lease");
    assert_eq!(store.try_lead("b", LEASE).await.unwrap(), None);
    // Renewing keeps the term.
    assert_eq!(
        store.try_lead("a", LEASE).await.unwrap(),
        Some(first.clone())
    );
    let created = rollout(Uuid::new_v4(), RolloutState::Running);
    store.insert_rollout(&created, &[]).await.unwrap();
    store
        .apply_rollout_pass(&created, &[], &[], Some(&first))
        .await
        .unwrap();
    // a's lease lapses (renewed for no time at all): b takes a new term.
    store.try_lead("a", Duration::ZERO).await.unwrap();
    let second = store
        .try_lead("b", LEASE)
        .await
        .unwrap()
        .expect("a lapsed lease");
    assert!(second.term > first.term, "{second:?} after {first:?}");
    let mut next = store.rollout(created.id).await.unwrap().unwrap();
    next.current_wave = 1;
    let fenced = store
        .apply_rollout_pass(&next, &[], &[], Some(&first))
        .await;
    assert!(
        matches!(&fenced, Err(StoreError::Fenced { holder, term }) if holder == "a" && *term == first.term),
        "{fenced:?}"
    );
    assert_eq!(
        store
            .rollout(created.id)
            .await
            .unwrap()
            .unwrap()
            .current_wave,
        0
    );
    store
        .apply_rollout_pass(&next, &[], &[], Some(&second))
        .await
        .unwrap();
    // A clean stop hands over at once.
    store.step_down(&second).await.unwrap();
    let third = store.try_lead("a", LEASE).await.unwrap().expect("given up");
    assert!(third.term > second.term);
}

pub(crate) async fn replicas_racing_for_the_lease_get_one_term<B: ContractBackend>(store: B) {
    let outcomes = race(&store, 8, |store, index| async move {
        store
            .try_lead(&format!("replica-{index}"), LEASE)
            .await
            .unwrap()
    })
    .await;
    let leaders: Vec<_> = outcomes.iter().flatten().collect();
    assert_eq!(leaders.len(), 1, "{outcomes:?}");
}

fn registration(name: &str) -> ReplicaRegistration {
    ReplicaRegistration {
        name: name.to_owned(),
        zone: format!("zone-{name}"),
        address: format!("{name}.example:7443"),
        started_at: 1_700_000_000,
    }
}

pub(crate) async fn replicas_and_session_holders_round_trip<B: ContractBackend>(store: B) {
    let machines = insert_machines(&store, 3).await;
    store
        .renew_replica(&registration("a"), LEASE)
        .await
        .unwrap();
    store
        .renew_replica(&registration("b"), LEASE)
        .await
        .unwrap();
    store.claim_session(machines[0], "a", 10).await.unwrap();
    store.claim_session(machines[1], "a", 10).await.unwrap();
    store.claim_session(machines[2], "b", 10).await.unwrap();
    // The agent of machine 1 moved to b; a's late release leaves b's claim.
    store.claim_session(machines[1], "b", 11).await.unwrap();
    store.release_session(machines[1], "a").await.unwrap();
    let holders = store.live_session_holders().await.unwrap();
    assert_eq!(holders.len(), 3);
    assert_eq!(holders[&machines[0]], "a");
    assert_eq!(holders[&machines[1]], "b");
    let leader = store.try_lead("a", LEASE).await.unwrap().unwrap();
    let replicas = store.replicas().await.unwrap();
    let summary: Vec<(String, String, bool, u64, bool)> = replicas
        .iter()
        .map(|replica| {
            (
                replica.registration.name.clone(),
                replica.registration.address.clone(),
                replica.leader,
                replica.sessions,
                replica.live,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a".into(), "a.example:7443".into(), true, 1, true),
            ("b".into(), "b.example:7443".into(), false, 2, true),
        ]
    );
    assert!(replicas.iter().all(|replica| replica.lease_age_ms < 30_000));
    store.step_down(&leader).await.unwrap();
    // b stops renewing (its lease lapses): its sessions are nobody's.
    store
        .renew_replica(&registration("b"), Duration::ZERO)
        .await
        .unwrap();
    let holders = store.live_session_holders().await.unwrap();
    assert_eq!(
        holders.keys().copied().collect::<Vec<_>>(),
        vec![machines[0]]
    );
    // a restarts: the sessions of its previous run are gone; then it stops.
    store.release_sessions_of("a").await.unwrap();
    assert!(store.live_session_holders().await.unwrap().is_empty());
    store.remove_replica("b").await.unwrap();
    let names: Vec<String> = store
        .replicas()
        .await
        .unwrap()
        .into_iter()
        .map(|replica| replica.registration.name)
        .collect();
    assert_eq!(names, vec!["a".to_owned()]);
}

pub(crate) async fn an_announced_change_reaches_every_subscriber<B: ContractBackend>(store: B) {
    let mut first = store.subscribe();
    let mut second = store.subscribe();
    let too_big = "x".repeat(crate::store::replicas::FEED_MESSAGE_MAX_BYTES + 1);
    assert!(store.announce(&too_big).await.is_err());
    // A subscription may start listening a moment after it is made (its own
    // connection): announce until the message arrives, up to a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut received = Vec::new();
    for subscriber in [&mut first, &mut second] {
        loop {
            assert!(tokio::time::Instant::now() < deadline, "no message arrived");
            store.announce("machines changed").await.unwrap();
            match tokio::time::timeout(Duration::from_millis(200), subscriber.recv()).await {
                Ok(Ok(FeedEvent::Message(message))) => {
                    received.push(message);
                    break;
                }
                Ok(Ok(FeedEvent::Resynchronise)) | Err(_) => continue,
                Ok(Err(error)) => panic!("{error}"),
            }
        }
    }
    assert_eq!(received, vec!["machines changed"; 2]);
}
