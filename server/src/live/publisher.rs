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

use std::collections::HashMap;
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
use crate::store::repair::{QuarantineRecord, RepairStore};
use crate::store::{ImageRecord, MachineRecord, Store, StoreError};

/// How long a push may wait for room in a session's queue before the session
/// is ended (the agent reconnects and gets the whole state on connect, so a
/// change is never lost).
const PUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Sessions whose queues a batch of pushes waits on at once: one full
/// queue (a slow agent, waiting up to [`PUSH_TIMEOUT`]) must not hold up
/// the rest of a wave.
const SENDS_IN_FLIGHT: usize = 64;

/// What every push of a batch needs from the store, read once for the
/// batch rather than once per machine: the desired images (a rollout's
/// wave shares one) and the quarantines of the machines pushed.
struct PushInputs {
    images: HashMap<(String, String), Option<ImageRecord>>,
    quarantines: HashMap<Uuid, QuarantineRecord>,
}

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
        let inputs = self.push_inputs(std::slice::from_ref(&machine)).await?;
        Ok(self.desired_state_from(machine, &inputs))
    }

    /// Reads what the desired states of `machines` need from the store:
    /// each distinct desired image once, and the quarantines (the one
    /// machine's, or every quarantine for a batch).
    async fn push_inputs(&self, machines: &[&MachineRecord]) -> Result<PushInputs, StoreError> {
        let mut images = HashMap::new();
        for desired in machines
            .iter()
            .filter_map(|machine| machine.desired_image.as_ref())
        {
            let key = (desired.name.clone(), desired.version.clone());
            if let std::collections::hash_map::Entry::Vacant(entry) = images.entry(key) {
                entry.insert(self.store.image(&desired.name, &desired.version).await?);
            }
        }
        let quarantines = match machines {
            [one] => self
                .quarantines
                .quarantine(one.id)
                .await?
                .into_iter()
                .collect(),
            _ => self.quarantines.quarantines().await?,
        };
        Ok(PushInputs {
            images,
            quarantines: quarantines
                .into_iter()
                .map(|quarantine| (quarantine.machine_id, quarantine))
                .collect(),
        })
    }

    fn desired_state_from(&self, machine: &MachineRecord, inputs: &PushInputs) -> DesiredState {
        let image = machine.desired_image.as_ref().and_then(|desired| {
            inputs
                .images
                .get(&(desired.name.clone(), desired.version.clone()))
                .and_then(Option::as_ref)
        });
        let mut desired = desired_state(machine, image, self.report_interval);
        desired.quarantine = inputs.quarantines.get(&machine.id).cloned();
        desired.access = Some(self.access_policy_for(machine));
        desired
    }

    /// Sends each of `machines` whose session is held here its whole
    /// desired state; `rollout` names the rollout that changed them, if one
    /// did. The store is read once for the batch, and the sessions' queues
    /// are waited on together.
    async fn push_many(&self, machines: &[MachineRecord], rollout: Option<Uuid>) {
        // Offline machines get the stored state when they reconnect.
        let held: Vec<&MachineRecord> = machines
            .iter()
            .filter(|machine| self.fan_out.holds_session(machine.id))
            .collect();
        if held.is_empty() {
            return;
        }
        let inputs = match self.push_inputs(&held).await {
            Ok(inputs) => inputs,
            Err(error) => {
                // The agents get their whole state when they reconnect.
                tracing::error!(machines = held.len(), %error, "cannot build desired states; ending the sessions");
                for machine in held {
                    self.fan_out.end_session(machine.id);
                }
                return;
            }
        };
        let inputs = &inputs;
        futures::stream::iter(held)
            .for_each_concurrent(SENDS_IN_FLIGHT, |machine| async move {
                let mut desired = self.desired_state_from(machine, inputs);
                if let Some(image) = desired.image.as_mut() {
                    image.rollout_id = rollout;
                }
                self.fan_out
                    .send(machine.id, SessionMessage::DesiredState(Box::new(desired)))
                    .await;
            })
            .await;
    }

    /// A machine's stored row changed (labels, image, quarantine): its
    /// session gets the new whole state, wherever it is held.
    pub async fn machine_changed(&self, machine: &MachineRecord) {
        self.push_many(std::slice::from_ref(machine), None).await;
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
        let held_elsewhere: Vec<Uuid> = machines
            .iter()
            .map(|machine| machine.id)
            .filter(|machine| !self.fan_out.holds_session(*machine))
            .collect();
        // Announced first: the other replicas push their part of the wave
        // while this one pushes its own.
        if !held_elsewhere.is_empty() {
            self.feed
                .announce(Change::RolloutPush {
                    rollout,
                    machines: held_elsewhere,
                })
                .await;
        }
        self.push_many(machines, Some(rollout)).await;
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

    /// Reads `machines` from the store in one query, refreshes their
    /// identity facts in the health tracker, and pushes those whose session
    /// is held here. A rollout push changes only desired images, so machines
    /// whose session is held elsewhere are not read at all. The feed applies
    /// changes one after the other: a wave read one machine at a time kept
    /// every later change (the image reports the leader waits on) queued
    /// behind it.
    async fn push_stored(&self, machines: &[Uuid], rollout: Option<Uuid>) {
        let wanted: Vec<Uuid> = machines
            .iter()
            .copied()
            .filter(|id| rollout.is_none() || self.fan_out.holds_session(*id))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let records = match self.store.machines_with_ids(&wanted).await {
            Ok(records) => records,
            Err(error) => {
                tracing::error!(machines = wanted.len(), %error, "cannot read machines changed elsewhere; ending their sessions so that they resync");
                for id in wanted {
                    self.fan_out.end_session(id);
                }
                return;
            }
        };
        let now = self.clock.now_unix();
        for machine in &records {
            self.health.upsert(machine, now);
        }
        self.push_many(&records, rollout).await;
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
