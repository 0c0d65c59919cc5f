//! Rollouts: stored with their machines, passes applied atomically, and one
//! active rollout per machine, whoever creates them at once.

use uuid::Uuid;

use super::{insert_machines, race, rollout, rollout_machine, ContractBackend};
use crate::domain::rollout::{MachineRolloutState, RolloutState};
use crate::store::RolloutCreation;

pub(crate) async fn rollouts_and_passes_round_trip<B: ContractBackend>(store: B) {
    let machine_id = insert_machines(&store, 1).await[0];
    let mut created = rollout(Uuid::new_v4(), RolloutState::Pending);
    let mut member = rollout_machine(created.id, machine_id, "web-1");
    assert_eq!(
        store
            .insert_rollout(&created, &[member.clone()])
            .await
            .unwrap(),
        RolloutCreation::Inserted
    );
    assert_eq!(
        store.rollout(created.id).await.unwrap(),
        Some(created.clone())
    );
    assert!(store.rollout(Uuid::new_v4()).await.unwrap().is_none());
    assert_eq!(
        store.rollout_machines(created.id).await.unwrap(),
        vec![member.clone()]
    );

    created.state = RolloutState::Running;
    created.wave_started_at = Some(1_700_000_720);
    member.state = MachineRolloutState::Sent;
    member.turn_at = Some(1_700_000_720);
    member.sent_at = Some(1_700_000_720);
    let updated = store
        .apply_rollout_pass(
            &created,
            &[member.clone()],
            &[(machine_id, created.image.desired())],
            None,
        )
        .await
        .unwrap();
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0].desired_version, 2);
    assert_eq!(updated[0].desired_image, Some(created.image.desired()));
    created.revision += 1;
    assert_eq!(store.rollouts().await.unwrap(), vec![created.clone()]);
    assert_eq!(
        store.rollout_machines(created.id).await.unwrap(),
        vec![member]
    );
    assert_eq!(
        store
            .machine(machine_id)
            .await
            .unwrap()
            .unwrap()
            .desired_version,
        2
    );
}

pub(crate) async fn two_rollouts_over_one_machine_created_at_once_make_one<B: ContractBackend>(
    store: B,
) {
    let machines = insert_machines(&store, 3).await;
    // Rollout 0 takes web-1 and web-2, rollout 1 web-2 and web-3: they share web-2.
    let rollouts = [
        rollout(Uuid::new_v4(), RolloutState::Pending),
        rollout(Uuid::new_v4(), RolloutState::Pending),
    ];
    let members = [
        vec![
            rollout_machine(rollouts[0].id, machines[0], "web-1"),
            rollout_machine(rollouts[0].id, machines[1], "web-2"),
        ],
        vec![
            rollout_machine(rollouts[1].id, machines[1], "web-2"),
            rollout_machine(rollouts[1].id, machines[2], "web-3"),
        ],
    ];
    let outcomes = {
        let (rollouts, members) = (rollouts.clone(), members.clone());
        race(&store, 2, move |store, index| {
            let (created, members) = (rollouts[index].clone(), members[index].clone());
            async move { store.insert_rollout(&created, &members).await.unwrap() }
        })
        .await
    };
    let winner = match outcomes
        .iter()
        .position(|outcome| *outcome == RolloutCreation::Inserted)
    {
        Some(winner) => winner,
        None => panic!("one creation must win: {outcomes:?}"),
    };
    let loser = 1 - winner;
    assert_eq!(
        outcomes[loser],
        RolloutCreation::Overlap {
            rollout: rollouts[winner].id,
            machines: vec![machines[1]],
        }
    );
    assert_eq!(
        store.rollouts().await.unwrap(),
        vec![rollouts[winner].clone()]
    );
    assert!(
        store
            .rollout_machines(rollouts[loser].id)
            .await
            .unwrap()
            .is_empty(),
        "nothing of the refused rollout was written"
    );
}

pub(crate) async fn a_finished_rollout_frees_its_machines<B: ContractBackend>(store: B) {
    let machine_id = insert_machines(&store, 1).await[0];
    let mut first = rollout(Uuid::new_v4(), RolloutState::Pending);
    store
        .insert_rollout(&first, &[rollout_machine(first.id, machine_id, "web-1")])
        .await
        .unwrap();
    // Paused is not finished: the machine is still held.
    first.state = RolloutState::Paused;
    store
        .apply_rollout_pass(&first, &[], &[], None)
        .await
        .unwrap();
    first.revision += 1;
    let second = rollout(Uuid::new_v4(), RolloutState::Pending);
    let second_members = [rollout_machine(second.id, machine_id, "web-1")];
    assert_eq!(
        store
            .insert_rollout(&second, &second_members)
            .await
            .unwrap(),
        RolloutCreation::Overlap {
            rollout: first.id,
            machines: vec![machine_id],
        }
    );
    first.state = RolloutState::Aborted;
    store
        .apply_rollout_pass(&first, &[], &[], None)
        .await
        .unwrap();
    assert_eq!(
        store
            .insert_rollout(&second, &second_members)
            .await
            .unwrap(),
        RolloutCreation::Inserted
    );
}
