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

/// A pass over a whole wave is one batch: every row and desired image is
/// stored (each desired-state version bumped once), and the rows and
/// machines can be read back by id, unknown ids left out.
pub(crate) async fn a_wave_is_stored_in_one_pass_and_read_back_by_id<B: ContractBackend>(store: B) {
    let machines = insert_machines(&store, 5).await;
    let mut created = rollout(Uuid::new_v4(), RolloutState::Pending);
    let mut members: Vec<_> = machines
        .iter()
        .enumerate()
        .map(|(index, id)| rollout_machine(created.id, *id, &format!("web-{}", index + 1)))
        .collect();
    members[4].previous_image = Some(crate::store::DesiredImageRecord {
        name: "app".into(),
        version: "1.0.0".into(),
        digest: "old".into(),
        rollback: false,
    });
    store.insert_rollout(&created, &members).await.unwrap();
    created.state = RolloutState::Running;
    // Four of five sent, one of them with a failure reason and a NULL time.
    for member in &mut members[..4] {
        member.state = MachineRolloutState::Sent;
        member.turn_at = Some(1_700_000_720);
        member.sent_at = Some(1_700_000_721);
    }
    members[3].state = MachineRolloutState::Failed;
    members[3].sent_at = None;
    members[3].failure_reason = "deadline passed".into();
    let sends: Vec<_> = machines[..4]
        .iter()
        .map(|id| (*id, created.image.desired()))
        .collect();
    let mut updated = store
        .apply_rollout_pass(&created, &members[..4], &sends, None)
        .await
        .unwrap();
    updated.sort_by_key(|machine| machine.inventory.hostname.clone());
    assert_eq!(
        updated
            .iter()
            .map(|machine| (machine.id, machine.desired_version))
            .collect::<Vec<_>>(),
        machines[..4].iter().map(|id| (*id, 2)).collect::<Vec<_>>(),
        "each sent machine's desired state moved one version"
    );
    assert!(updated
        .iter()
        .all(|machine| machine.desired_image == Some(created.image.desired())));
    assert_eq!(store.rollout_machines(created.id).await.unwrap(), members);

    let unknown = Uuid::new_v4();
    let mut some = store
        .rollout_machines_with_ids(created.id, &[machines[3], machines[4], unknown])
        .await
        .unwrap();
    some.sort_by_key(|row| row.hostname.clone());
    assert_eq!(some, members[3..].to_vec());
    assert!(store
        .rollout_machines_with_ids(Uuid::new_v4(), &machines)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .rollout_machines_with_ids(created.id, &[])
        .await
        .unwrap()
        .is_empty());

    let mut read = store
        .machines_with_ids(&[machines[0], machines[4], unknown])
        .await
        .unwrap();
    read.sort_by_key(|machine| machine.inventory.hostname.clone());
    assert_eq!(
        read.iter()
            .map(|machine| (machine.id, machine.desired_version))
            .collect::<Vec<_>>(),
        vec![(machines[0], 2), (machines[4], 1)]
    );
    assert!(store.machines_with_ids(&[]).await.unwrap().is_empty());
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
