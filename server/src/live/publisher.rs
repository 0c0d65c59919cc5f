//! The desired-state publisher: the only code that builds a machine's desired
//! state and sends it, and the only code that fans an access change out to
//! every session.
//!
//! Services change stored rows and then tell the publisher what changed
//! (`machine_changed`, `access_changed`, `refuse_session`); the publisher
//! rebuilds from the store and hands messages to a [`SessionFanOut`] — the
//! local [`Registry`] — and announces the change on the [`Feed`], so that
//! every other replica does the same for the sessions it holds (the
//! `*_elsewhere` methods, called by `live::feed`).
//!
//! What must never happen here: a decision about *what* a machine should run
//! (services and controllers decide and store it first), or a wire type.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc::error::TrySendError;
use uuid::Uuid;

use crate::clock::Clock;
use crate::domain::access_policy::{compile_policy, AccessInputs, MachinePolicy};
use crate::domain::desired_state::{desired_state, DesiredState};
use crate::live::access_hub::AccessHub;
use crate::live::feed::{Change, Feed};
use crate::live::health::HealthTracker;
use crate::live::registry::{Registry, SessionMessage};
use crate::live::replicas::ReplicaSet;
use crate::store::repair::RepairStore;
use crate::store::{MachineRecord, Store, StoreError};

/// How long a push may wait for room in a session's queue before the session
/// is ended (the agent reconnects and gets the whole state on connect, so a
/// change is never lost).
const PUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Machines read and pushed at once after a change made elsewhere: enough
/// to overlap the store's round trips, well under its connection pool.
const PUSHES_IN_FLIGHT: usize = 8;

/// Where sessions live: delivers messages to the sessions this process (or,
/// behind another implementation, the replica set) holds.
#[async_trait::async_trait]
pub trait SessionFanOut: Send + Sync + 'static {
    /// Whether a live session of `machine` is held here.
    fn holds_session(&self, machine: Uuid) -> bool;
    /// Queues `message` to the session of `machine`, if there is one; a
    /// session whose queue stays full is ended instead.
    async fn send(&self, machine: Uuid, message: SessionMessage);
    /// Queues to every held session the message `message_for` gives it
    /// (`None` skips it), without waiting on any one session. Returns how many
    /// were queued at once.
    fn send_to_every_session(
        &self,
        message_for: &mut dyn FnMut(Uuid) -> Option<SessionMessage>,
    ) -> usize;
    /// Ends the session of `machine`, if there is one (the agent reconnects).
    fn end_session(&self, machine: Uuid);
}

#[async_trait::async_trait]
impl SessionFanOut for Registry {
    fn holds_session(&self, machine: Uuid) -> bool {
        self.sender(machine).is_some()
    }

    async fn send(&self, machine: Uuid, message: SessionMessage) {
        let Some(sender) = self.sender(machine) else {
            return;
        };
        match tokio::time::timeout(PUSH_TIMEOUT, sender.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {} // the session ended meanwhile; it gets the state on reconnect
            Err(_) => {
                tracing::warn!(machine = %machine, "session queue full; ending the session so the agent resyncs");
                self.end_session(machine);
            }
        }
    }

    fn send_to_every_session(
        &self,
        message_for: &mut dyn FnMut(Uuid) -> Option<SessionMessage>,
    ) -> usize {
        let mut queued = 0usize;
        for (machine, sender, session_cancel) in self.sessions_for_fan_out() {
            let Some(message) = message_for(machine) else {
                continue;
            };
            match sender.try_send(message) {
                Ok(()) => queued += 1,
                Err(TrySendError::Closed(_)) => {} // it gets the state on reconnect
                Err(TrySendError::Full(message)) => {
                    // A slow session gets a moment; then it is ended so that
                    // the agent reconnects and receives the state first thing.
                    tokio::spawn(async move {
                        let sent = tokio::time::timeout(PUSH_TIMEOUT, sender.send(message)).await;
                        if sent.is_err() {
                            tracing::warn!(machine = %machine, "session queue full during a fan-out; ending the session so the agent resyncs");
                            session_cancel.cancel();
                        }
                    });
                }
            }
        }
        queued
    }

    fn end_session(&self, machine: Uuid) {
        Registry::end_session(self, machine);
    }
}

/// Builds desired states from the store and sends them through a fan-out.
pub struct Publisher {
    fan_out: Arc<dyn SessionFanOut>,
    feed: Arc<Feed>,
    replicas: Arc<ReplicaSet>,
    store: Arc<dyn Store>,
    quarantines: Arc<dyn RepairStore>,
    access: Arc<AccessHub>,
    health: Arc<HealthTracker>,
    clock: Arc<dyn Clock>,
    report_interval: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

/// What the publisher reads from: the stores, the live access inputs and
/// health (labels of connected machines), the clock.
#[derive(Clone)]
pub struct PublisherSources {
    pub store: Arc<dyn Store>,
    pub quarantines: Arc<dyn RepairStore>,
    pub access: Arc<AccessHub>,
    pub health: Arc<HealthTracker>,
    pub clock: Arc<dyn Clock>,
    pub report_interval: Duration,
    pub feed: Arc<Feed>,
    pub replicas: Arc<ReplicaSet>,
}

impl Publisher {
    pub fn new(fan_out: Arc<dyn SessionFanOut>, sources: PublisherSources) -> Self {
        Publisher {
            fan_out,
            feed: sources.feed,
            replicas: sources.replicas,
            store: sources.store,
            quarantines: sources.quarantines,
            access: sources.access,
            health: sources.health,
            clock: sources.clock,
            report_interval: sources.report_interval,
        }
    }

    /// The access policy `machine` must apply now.
    fn access_policy_for(&self, machine: &MachineRecord) -> MachinePolicy {
        compile_policy(
            &self.access.current(),
            &machine.labels,
            &machine.zone,
            self.clock.now_unix(),
        )
    }

    /// The whole desired state of `machine`, read from the store: what a
    /// session receives on connect and after every change.
    pub async fn desired_state_of(
        &self,
        machine: &MachineRecord,
    ) -> Result<DesiredState, StoreError> {
        let image = match &machine.desired_image {
            Some(desired) => self.store.image(&desired.name, &desired.version).await?,
            None => None,
        };
        let mut desired = desired_state(machine, image.as_ref(), self.report_interval);
        desired.quarantine = self.quarantines.quarantine(machine.id).await?;
        desired.access = Some(self.access_policy_for(machine));
        Ok(desired)
    }

    /// Sends `machine`'s whole desired state to its live session, if it has
    /// one. `rollout` names the rollout that changed it, if one did.
    async fn push(&self, machine: &MachineRecord, rollout: Option<Uuid>) {
        if !self.fan_out.holds_session(machine.id) {
            // Offline: it gets the stored state when it reconnects.
            return;
        }
        let mut desired = match self.desired_state_of(machine).await {
            Ok(desired) => desired,
            Err(error) => {
                // The agent gets the whole state when it reconnects.
                tracing::error!(machine = %machine.id, %error, "cannot build desired state; ending the session");
                self.fan_out.end_session(machine.id);
                return;
            }
        };
        if let Some(image) = desired.image.as_mut() {
            image.rollout_id = rollout;
        }
        self.fan_out
            .send(machine.id, SessionMessage::DesiredState(Box::new(desired)))
            .await;
    }

    /// A machine's stored row changed (labels, image, quarantine): its
    /// session gets the new whole state, wherever it is held.
    pub async fn machine_changed(&self, machine: &MachineRecord) {
        self.push(machine, None).await;
        if !self.fan_out.holds_session(machine.id) {
            self.feed
                .announce(Change::Machines {
                    machines: vec![machine.id],
                })
                .await;
        }
    }

    /// A rollout stored new desired images for `machines`.
    pub async fn rollout_changed(&self, machines: &[MachineRecord], rollout: Uuid) {
        let mut held_elsewhere = Vec::new();
        for machine in machines {
            if self.fan_out.holds_session(machine.id) {
                self.push(machine, Some(rollout)).await;
            } else {
                held_elsewhere.push(machine.id);
            }
        }
        if !held_elsewhere.is_empty() {
            self.feed
                .announce(Change::RolloutPush {
                    rollout,
                    machines: held_elsewhere,
                })
                .await;
        }
    }

    /// Machines whose rows another replica changed (or whose agents lag
    /// behind the stored state): the sessions held here get their whole
    /// state again, and the health tracker their labels.
    pub async fn push_stored_states(&self, machines: &[Uuid]) {
        self.push_stored(machines, None).await;
    }

    /// Another replica's rollout stored new desired images for `machines`.
    pub async fn rollout_pushed_elsewhere(&self, rollout: Uuid, machines: &[Uuid]) {
        self.push_stored(machines, Some(rollout)).await;
    }

    /// Reads each of `machines` from the store, refreshes its identity facts
    /// in the health tracker, and pushes it if its session is held here —
    /// [`PUSHES_IN_FLIGHT`] at a time, since the feed applies changes one
    /// after the other and a rollout wave read one machine at a time kept
    /// every later change (the image reports the leader waits on) queued
    /// behind it. A rollout push changes only desired images, so machines
    /// whose session is held elsewhere are not read at all.
    async fn push_stored(&self, machines: &[Uuid], rollout: Option<Uuid>) {
        let now = self.clock.now_unix();
        futures::stream::iter(machines.iter().copied())
            .filter(|id| std::future::ready(rollout.is_none() || self.fan_out.holds_session(*id)))
            .for_each_concurrent(PUSHES_IN_FLIGHT, |id| async move {
                match self.store.machine(id).await {
                    Ok(Some(machine)) => {
                        self.health.upsert(&machine, now);
                        self.push(&machine, rollout).await;
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::error!(machine = %id, %error, "cannot read a machine changed elsewhere; ending its session so that it resyncs");
                        self.fan_out.end_session(id);
                    }
                }
            })
            .await;
    }

    /// After a gap in the change feed: every session held here gets its
    /// whole state again, rebuilt from the store.
    pub async fn resynchronise_held_sessions(&self) {
        if let Err(error) = self.access.refresh().await {
            tracing::error!(%error, "cannot reload the access inputs");
        }
        let held: Vec<Uuid> = self
            .health
            .snapshot()
            .into_keys()
            .filter(|machine| self.fan_out.holds_session(*machine))
            .collect();
        self.push_stored(&held, None).await;
    }

    /// Access inputs changed and were committed: refreshes them and pushes
    /// each connected machine its recompiled policy. Returns the version.
    ///
    /// Labels and zones come from the health tracker, which holds every
    /// connected machine (upserted at hello, enrollment and relabel): a
    /// fan-out reads nothing per machine from the store. A relabel racing
    /// with it pushes its own desired state, compiled for the new labels.
    pub async fn access_changed(&self) -> Result<u64, StoreError> {
        let version = self.fan_out_fresh_access().await?;
        self.feed.announce(Change::Access).await;
        Ok(version)
    }

    /// Another replica changed the access inputs: the sessions held here
    /// get the recompiled policy.
    pub async fn access_changed_elsewhere(&self) {
        if let Err(error) = self.fan_out_fresh_access().await {
            tracing::error!(%error, "cannot reload access inputs changed elsewhere");
        }
    }

    /// Re-reads the access inputs and pushes every session held here its
    /// recompiled policy; returns the version.
    async fn fan_out_fresh_access(&self) -> Result<u64, StoreError> {
        let started = std::time::Instant::now();
        let inputs = self.access.refresh().await?;
        let read = started.elapsed();
        let queued = self.fan_out_access(&inputs);
        tracing::info!(
            version = inputs.version,
            queued,
            read_ms = read.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "access change published"
        );
        Ok(inputs.version)
    }

    fn fan_out_access(&self, inputs: &AccessInputs) -> usize {
        let machines = self.health.snapshot();
        let now = self.clock.now_unix();
        self.fan_out.send_to_every_session(&mut |machine_id| {
            let machine = machines.get(&machine_id)?;
            Some(SessionMessage::AccessPolicy(compile_policy(
                inputs,
                &machine.labels,
                &machine.zone,
                now,
            )))
        })
    }

    /// Asks `machine` to verify its image now (or restore it first),
    /// wherever its session is held; false if no live session holds it.
    pub async fn image_command(&self, machine: Uuid, request_id: String, restore: bool) -> bool {
        if self.fan_out.holds_session(machine) {
            self.image_command_if_held(machine, request_id, restore)
                .await;
            return true;
        }
        if !self.replicas.held_elsewhere(machine) {
            return false;
        }
        self.feed
            .announce(Change::ImageCommand {
                machine,
                request_id,
                restore,
            })
            .await;
        true
    }

    /// [`Publisher::image_command`] for a session held here (asked here or
    /// through another replica); nothing if it is not held here.
    pub async fn image_command_if_held(&self, machine: Uuid, request_id: String, restore: bool) {
        if self.fan_out.holds_session(machine) {
            self.fan_out
                .send(
                    machine,
                    SessionMessage::ImageCommand {
                        request_id,
                        restore,
                    },
                )
                .await;
        }
    }

    /// Tells a machine's session why it may not continue, then ends it,
    /// whichever replica holds it.
    pub async fn refuse_session(&self, machine: Uuid, reason: String) {
        if !self.fan_out.holds_session(machine) {
            self.feed.announce(Change::Refuse { machine, reason }).await;
            return;
        }
        self.refuse_held_session(machine, reason).await;
    }

    /// [`Publisher::refuse_session`] for a session held here (if it is).
    pub async fn refuse_held_session(&self, machine: Uuid, reason: String) {
        self.fan_out
            .send(machine, SessionMessage::Refused(reason))
            .await;
        self.fan_out.end_session(machine);
    }
}
