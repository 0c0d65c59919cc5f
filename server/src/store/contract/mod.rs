//! The store contract: one suite of tests over the store traits (`Store`,
//! `AccessStore`, `RolloutStore`, `RepairStore`, `ReplicaStore`) that every backend must
//! pass, written as generic functions over a [`ContractBackend`].
//!
//! A backend runs the whole suite with one line in its own tests,
//! `store_contract_suite!(factory);`, where `factory` is an async function
//! returning a fresh, empty store and a guard that cleans up when dropped
//! (see `sqlite::tests::fresh_sqlite_store`). Rules that must hold under
//! concurrency (single-use tokens, one audit chain, at least one admin, one
//! quarantine, one rollout per machine) are raced here with real tasks on
//! a multi-threaded runtime, so a backend whose operations are not atomic
//! fails. Only test code lives here; backends never depend on it.

pub(crate) mod access;
pub(crate) mod audit;
pub(crate) mod images;
pub(crate) mod integrity;
pub(crate) mod machines;
pub(crate) mod operators;
pub(crate) mod repair;
pub(crate) mod replicas;
pub(crate) mod rollouts;
pub(crate) mod tokens;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use uuid::Uuid;

use super::integrity::IntegrityStore;
use super::repair::RepairStore;
use super::replicas::ReplicaStore;
use super::{
    AccessStore, Inventory, JoinTokenRecord, MachineRecord, OperatorRecord, RolloutStore, Store,
};
use crate::domain::rollout::plan::parse_plan;
use crate::domain::rollout::{
    MachineRolloutState, Rollout, RolloutImage, RolloutMachine, RolloutState,
};
use flotte_common::audit::AuditEvent;
use flotte_common::roles::Role;

/// Everything a backend implements; a clone is another handle on the same
/// store (what concurrent callers hold).
pub(crate) trait ContractBackend:
    Store + AccessStore + RolloutStore + RepairStore + ReplicaStore + IntegrityStore + Clone
{
}

impl<
        T: Store + AccessStore + RolloutStore + RepairStore + ReplicaStore + IntegrityStore + Clone,
    > ContractBackend for T
{
}

/// Runs `count` calls at once, each on a task of its own with its own handle
/// on `store`, released together by a barrier; their results, in call order.
pub(crate) async fn race<B, T, Call, Calling>(store: &B, count: usize, call: Call) -> Vec<T>
where
    B: ContractBackend,
    Call: Fn(B, usize) -> Calling,
    Calling: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(count));
    let tasks: Vec<_> = (0..count)
        .map(|index| {
            let calling = call(store.clone(), index);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                calling.await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(count);
    for task in tasks {
        results.push(task.await.expect("a racing call panicked"));
    }
    results
}

pub(crate) fn labels() -> BTreeMap<String, String> {
    [
        ("role".to_owned(), "web".to_owned()),
        ("env".to_owned(), "prod".to_owned()),
    ]
    .into()
}

pub(crate) fn token(id: &str, secret_hash: &str, uses_allowed: u32) -> JoinTokenRecord {
    JoinTokenRecord {
        id: id.into(),
        secret_hash: secret_hash.into(),
        labels: labels(),
        zone: "dc1".into(),
        created_at: 1_700_000_000,
        expires_at: 1_900_000_000,
        uses_allowed,
        uses_done: 0,
        revoked: false,
        revoked_at: None,
        last_used_at: None,
    }
}

pub(crate) fn machine(id: Uuid, hostname: &str) -> MachineRecord {
    MachineRecord {
        id,
        labels: labels(),
        zone: "dc1".into(),
        enrolled_at: 1_700_000_100,
        enrolled_with_token: "tok1".into(),
        certificate_serial: "0a01".into(),
        previous_certificate_serial: String::new(),
        certificate_not_after: 1_750_000_000,
        inventory: Inventory {
            hostname: hostname.into(),
            ..Inventory::default()
        },
        last_seen: 1_700_000_100,
        desired_version: 1,
        state: "unknown".into(),
        state_reason: String::new(),
        state_since: 0,
        retired_at: None,
        desired_image: None,
    }
}

pub(crate) fn operator(name: &str, role: Role) -> OperatorRecord {
    OperatorRecord {
        name: name.into(),
        role,
        created_at: 1_700_000_000,
        created_by: "init".into(),
        certificate_serial: format!("0c{name}"),
        certificate_not_after: 1_800_000_000,
        revoked_at: None,
    }
}

pub(crate) fn audit_event(at: i64, actor: &str, action: &str) -> AuditEvent {
    AuditEvent {
        at,
        actor: actor.into(),
        role: "admin".into(),
        action: action.into(),
        arguments_json: "{\"name\":\"bob\"}".into(),
        result: "ok".into(),
    }
}

/// A one-stage rollout of `app@2.0.0`, created by alice.
pub(crate) fn rollout(id: Uuid, state: RolloutState) -> Rollout {
    let plan_toml = "[[stage]]\nname = \"all\"\n";
    Rollout {
        id,
        image: RolloutImage {
            name: "app".into(),
            version: "2.0.0".into(),
            digest: "d2".into(),
        },
        plan: parse_plan(plan_toml).expect("the sample plan parses"),
        plan_toml: plan_toml.into(),
        state,
        reason: "created by alice".into(),
        created_at: 1_700_000_700,
        created_by: "alice".into(),
        updated_at: 1_700_000_710,
        wave_stages: vec![0],
        current_wave: 0,
        wave_started_at: Some(1_700_000_710),
        approved_stages: vec![],
        revision: 0,
    }
}

/// A machine of `rollout_id`, pending in its first wave.
pub(crate) fn rollout_machine(
    rollout_id: Uuid,
    machine_id: Uuid,
    hostname: &str,
) -> RolloutMachine {
    RolloutMachine {
        rollout_id,
        machine_id,
        hostname: hostname.into(),
        zone: "dc1".into(),
        stage: 0,
        wave: 0,
        state: MachineRolloutState::Pending,
        previous_image: None,
        turn_at: None,
        sent_at: None,
        committed_at: None,
        finished_at: None,
        failure_reason: String::new(),
    }
}

/// Stores `count` machines named `web-1`…; their ids, in that order.
pub(crate) async fn insert_machines<B: ContractBackend>(store: &B, count: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    for index in 1..=count {
        let id = Uuid::new_v4();
        store
            .insert_machine(&machine(id, &format!("web-{index}")))
            .await
            .expect("insert a machine");
        ids.push(id);
    }
    ids
}

/// Every contract test, run against the backend that `$factory` makes:
/// `async fn() -> (B, Guard)` with `B: ContractBackend`. With `skippable`,
/// the factory returns `Option<(B, Guard)>` and `None` skips the test (a
/// backend on an external server the environment explicitly declined).
macro_rules! store_contract_suite {
    ($factory:path) => {
        $crate::store::contract::store_contract_suite!(@list required $factory);
    };
    (skippable $factory:path) => {
        $crate::store::contract::store_contract_suite!(@list skippable $factory);
    };
    (@prepare required $factory:path) => {
        Some($factory().await)
    };
    (@prepare skippable $factory:path) => {
        $factory().await
    };
    (@list $mode:ident $factory:path) => {
        $crate::store::contract::store_contract_suite!(@each $mode $factory;
            tokens::a_single_use_token_is_redeemed_once_under_a_race,
            tokens::a_token_with_several_uses_is_spent_exactly_that_often_under_a_race,
            tokens::expired_and_revoked_tokens_are_refused_with_their_reason,
            machines::machines_round_trip_and_last_seen_batches,
            machines::transitions_desired_images_and_retirement,
            images::images_and_release_keys_round_trip,
            operators::operators_and_the_deny_list_round_trip,
            operators::two_admins_revoked_at_once_leave_one,
            operators::two_admins_demoted_at_once_leave_one,
            operators::a_renewed_certificate_is_recorded_for_active_operators_only,
            audit::concurrent_appends_make_one_valid_chain,
            audit::entries_filter_by_time_and_actor,
            audit::entries_page_by_sequence_and_checkpoints_are_kept_once,
            rollouts::rollouts_and_passes_round_trip,
            rollouts::a_wave_is_stored_in_one_pass_and_read_back_by_id,
            rollouts::two_rollouts_over_one_machine_created_at_once_make_one,
            rollouts::a_finished_rollout_frees_its_machines,
            access::every_change_bumps_the_version_and_revoking_a_user_removes_everything,
            repair::quarantines_and_remediation_events_round_trip,
            repair::two_quarantines_at_once_quarantine_once,
            repair::two_releases_at_once_release_once,
            replicas::a_stale_rollout_write_is_refused_and_changes_nothing,
            replicas::one_replica_leads_and_an_ended_term_is_fenced,
            replicas::replicas_racing_for_the_lease_get_one_term,
            replicas::replicas_and_session_holders_round_trip,
            replicas::an_announced_change_reaches_every_subscriber,
            integrity::a_machine_keeps_its_last_verification_only,
        );
    };
    (@each $mode:ident $factory:path; $($module:ident :: $test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let Some((store, _cleanup)) =
                    $crate::store::contract::store_contract_suite!(@prepare $mode $factory)
                else {
                    return;
                };
                $crate::store::contract::$module::$test(store).await;
            }
        )*
    };
}
pub(crate) use store_contract_suite;
