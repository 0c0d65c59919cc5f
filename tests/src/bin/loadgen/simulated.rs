//! The load generator's stand-ins behind the agent session's seams: an
//! access handler that acknowledges each policy version the moment it
//! arrives (and writes nothing anywhere), and an image manager that
//! "commits" each desired image the moment it arrives. Both record when,
//! on this process's clock, for the published figures.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use flotte_agent::session::{AccessHandler, ImageManager};
use flotte_proto::v1::{AccessPolicy, AccessState, DesiredImage, ImageStatus, SwapStatus};
use tokio::sync::watch;
use uuid::Uuid;

/// When a simulated agent acknowledged each access policy version (first
/// time only), for the access propagation figures.
#[derive(Debug, Default)]
pub struct SimulatedAckLog {
    acks: Mutex<Vec<(u64, Instant)>>,
}

impl SimulatedAckLog {
    fn lock(&self) -> MutexGuard<'_, Vec<(u64, Instant)>> {
        // Every write is one push: a poisoned lock still holds whole entries.
        self.acks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, version: u64) {
        let mut acks = self.lock();
        if !acks.iter().any(|(known, _)| *known == version) {
            acks.push((version, Instant::now()));
        }
    }

    /// When a version at least `version` was first acknowledged.
    pub fn first_ack_of_at_least(&self, version: u64) -> Option<Instant> {
        self.lock()
            .iter()
            .filter(|(known, _)| *known >= version)
            .map(|(_, at)| *at)
            .min()
    }
}

impl AccessHandler for SimulatedAckLog {
    fn apply(&self, policy: &AccessPolicy) -> Option<AccessState> {
        self.record(policy.version);
        Some(AccessState {
            applied_version: policy.version,
            ..AccessState::default()
        })
    }
}

/// When each simulated agent received its desired image and published the
/// committed status.
#[derive(Debug, Default)]
pub struct SimulatedSwapLog {
    swaps: Mutex<HashMap<Uuid, (Instant, Instant)>>,
}

impl SimulatedSwapLog {
    /// `(received, committed)` per machine so far.
    pub fn swaps(&self) -> MutexGuard<'_, HashMap<Uuid, (Instant, Instant)>> {
        // Every write is one insert: a poisoned lock still holds whole entries.
        self.swaps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A *simulated* swap manager: the desired image is committed the moment
/// it arrives (status published, which makes the session report at once).
#[derive(Debug)]
pub struct SimulatedImages {
    machine: Uuid,
    status: watch::Sender<ImageStatus>,
    log: std::sync::Arc<SimulatedSwapLog>,
}

impl SimulatedImages {
    pub fn new(machine: Uuid, log: std::sync::Arc<SimulatedSwapLog>) -> Self {
        SimulatedImages {
            machine,
            status: watch::Sender::new(ImageStatus::default()),
            log,
        }
    }
}

impl ImageManager for SimulatedImages {
    fn desire(&self, _version: u64, image: DesiredImage) {
        let received = Instant::now();
        let Some(target) = image.image else {
            return;
        };
        let committed = self.status.send_if_modified(|status| {
            if status
                .current
                .as_ref()
                .is_some_and(|current| current.digest == target.digest)
            {
                return false;
            }
            status.previous = status.current.take();
            status.current = Some(target.clone());
            status.swap = Some(SwapStatus {
                target: Some(target.clone()),
                step: "committed".to_owned(),
                outcome: "committed".to_owned(),
                updated_at: flotte_agent::clock::unix_now(),
                ..SwapStatus::default()
            });
            true
        });
        if committed {
            self.log
                .swaps()
                .insert(self.machine, (received, Instant::now()));
        }
    }

    fn status(&self) -> watch::Receiver<ImageStatus> {
        self.status.subscribe()
    }
}
