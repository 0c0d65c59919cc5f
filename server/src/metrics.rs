//! The server's Prometheus metrics: machines by state and zone, connected
//! agents, RPC counts and latencies, store writes, transitions, alerts,
//! image bytes served, rollouts by state, the remediation breaker (whole and
//! per zone), machines behind on their access policy, and the allocator's
//! memory (allocated against resident bytes).
//! Gauges derived from live state are refreshed when scraped, so no hot path
//! pays for them. Every label set is bounded: states are fixed lists, zones
//! are the fleet's (at most [`MAX_ZONE_SERIES`] per family); nothing is
//! labelled per machine or per rollout.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateZoneLabels {
    state: String,
    zone: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// `zone` empty (which Prometheus reads as absent): the breaker as a whole.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ZoneLabels {
    zone: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToStateLabels {
    to: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Store write counters, owned by the store and registered here.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    pub writes: Counter,
    pub write_duration: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            writes: Counter::default(),
            write_duration: latency_histogram(),
        }
    }
}

/// Zones given a series of their own in a per-zone family; a fleet with
/// more zones than this is cut (the breaker's whole series still says it).
pub const MAX_ZONE_SERIES: usize = 64;

/// What a scrape reads from live state, gathered by the caller.
#[derive(Debug, Clone, Default)]
pub struct LiveGauges {
    pub machines_by_state_and_zone: Vec<((String, String), i64)>,
    pub connected: usize,
    pub on_old_images: u64,
    /// Every rollout state with its count; `None` when they could not be read
    /// (the previous values stay).
    pub rollouts_by_state: Option<Vec<(&'static str, i64)>>,
    pub breaker_open: bool,
    pub breaker_zones: Vec<String>,
    /// Machines connected here whose acknowledged access policy version is
    /// older than the current one.
    pub access_policy_behind: u64,
    /// jemalloc's statistics; `None` when they could not be read (the
    /// previous values stay).
    pub allocator: Option<crate::allocator::AllocatorStatistics>,
}

/// Cheap to clone: every field shares its atomics.
#[derive(Clone)]
pub struct ServerMetrics {
    registry: Arc<Mutex<Registry>>,
    machines: Family<StateZoneLabels, Gauge>,
    connected_agents: Gauge,
    machines_on_old_images: Gauge,
    rollouts: Family<StateLabels, Gauge>,
    breaker_open: Family<ZoneLabels, Gauge>,
    access_policy_behind: Gauge,
    allocator_allocated: Gauge,
    allocator_resident: Gauge,
    allocator_retained: Gauge,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
    transitions: Family<ToStateLabels, Counter>,
    alerts: Family<ResultLabels, Counter>,
    pub store: StoreMetrics,
    /// Image payload bytes sent to agents: shows whether downloads resume.
    pub image_bytes_served: Counter,
    /// Reports received on agent sessions: shows that reports flow (and,
    /// beside `store_writes`, that they cost no store write).
    pub agent_reports: Counter,
    /// Passes of the rollout loop: lets a test wait for the loop to have
    /// looked, instead of sleeping and hoping it did.
    pub rollout_passes: Counter,
}

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerMetrics").finish_non_exhaustive()
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flotte");
        let machines = Family::<StateZoneLabels, Gauge>::default();
        registry.register(
            "machines",
            "Machines by health state and zone",
            machines.clone(),
        );
        let connected_agents = Gauge::default();
        let machines_on_old_images = Gauge::default();
        registry.register(
            "connected_agents",
            "Agents with an open session",
            connected_agents.clone(),
        );
        registry.register(
            "machines_on_old_images",
            "Machines running an image built longer ago than image_max_age",
            machines_on_old_images.clone(),
        );
        let rollouts = Family::<StateLabels, Gauge>::default();
        registry.register("rollouts", "Rollouts by state", rollouts.clone());
        let breaker_open = Family::<ZoneLabels, Gauge>::default();
        registry.register(
            "remediation_breaker_open",
            "1 while the remediation breaker is open (zone=\"\"); per zone, 1 while that zone is over its share",
            breaker_open.clone(),
        );
        let access_policy_behind = Gauge::default();
        registry.register(
            "access_policy_behind",
            "Machines connected to this replica that have not acknowledged the current access policy",
            access_policy_behind.clone(),
        );
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "gRPC requests by method and status code",
            rpc_requests.clone(),
        );
        let rpc_duration =
            Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register_with_unit(
            "rpc_duration",
            "Time to the response headers of gRPC requests (streams: time to open)",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let transitions = Family::<ToStateLabels, Counter>::default();
        registry.register(
            "machine_transitions",
            "Machine state transitions by new state",
            transitions.clone(),
        );
        let alerts = Family::<ResultLabels, Counter>::default();
        registry.register("alerts", "Webhook alerts by outcome", alerts.clone());
        let store = StoreMetrics::default();
        registry.register(
            "store_writes",
            "Writes to the durable store",
            store.writes.clone(),
        );
        registry.register_with_unit(
            "store_write_duration",
            "Duration of writes to the durable store",
            Unit::Seconds,
            store.write_duration.clone(),
        );
        let image_bytes_served = Counter::default();
        registry.register_with_unit(
            "image_served",
            "Image payload bytes sent to agents",
            Unit::Bytes,
            image_bytes_served.clone(),
        );
        let agent_reports = Counter::default();
        registry.register(
            "agent_reports",
            "Reports received from agents",
            agent_reports.clone(),
        );
        let allocator_allocated = Gauge::default();
        registry.register_with_unit(
            "allocator_allocated",
            "Bytes the server has allocated and not freed (jemalloc): its live data",
            Unit::Bytes,
            allocator_allocated.clone(),
        );
        let allocator_resident = Gauge::default();
        registry.register_with_unit(
            "allocator_resident",
            "Bytes in pages the allocator counts as resident (an upper bound): live data, its metadata and freed pages not yet returned",
            Unit::Bytes,
            allocator_resident.clone(),
        );
        let allocator_retained = Gauge::default();
        registry.register_with_unit(
            "allocator_retained",
            "Bytes of address space the allocator keeps mapped after returning their pages",
            Unit::Bytes,
            allocator_retained.clone(),
        );
        let rollout_passes = Counter::default();
        registry.register(
            "rollout_passes",
            "Passes of the rollout loop",
            rollout_passes.clone(),
        );
        ServerMetrics {
            registry: Arc::new(Mutex::new(registry)),
            machines,
            connected_agents,
            machines_on_old_images,
            rollouts,
            breaker_open,
            access_policy_behind,
            allocator_allocated,
            allocator_resident,
            allocator_retained,
            rpc_requests,
            rpc_duration,
            transitions,
            alerts,
            store,
            image_bytes_served,
            agent_reports,
            rollout_passes,
        }
    }

    pub fn record_transition(&self, to: &str) {
        self.transitions
            .get_or_create(&ToStateLabels { to: to.to_owned() })
            .inc();
    }

    pub fn record_alert(&self, delivered: bool) {
        self.alerts
            .get_or_create(&ResultLabels {
                result: if delivered { "delivered" } else { "dropped" },
            })
            .inc();
    }

    pub(crate) fn record_rpc(&self, method: &str, code: &str, seconds: f64) {
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.rpc_duration
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(seconds);
    }

    /// Encodes every metric after refreshing the live gauges from `live`.
    pub fn encode(&self, live: &LiveGauges) -> String {
        let count = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.machines_on_old_images.set(count(live.on_old_images));
        self.machines.clear();
        for ((state, zone), machines) in &live.machines_by_state_and_zone {
            self.machines
                .get_or_create(&StateZoneLabels {
                    state: state.clone(),
                    zone: zone.clone(),
                })
                .set(*machines);
        }
        self.connected_agents
            .set(i64::try_from(live.connected).unwrap_or(i64::MAX));
        if let Some(rollouts) = &live.rollouts_by_state {
            for (state, rollouts_in_state) in rollouts {
                self.rollouts
                    .get_or_create(&StateLabels { state })
                    .set(*rollouts_in_state);
            }
        }
        self.breaker_open.clear();
        self.breaker_open
            .get_or_create(&ZoneLabels { zone: None })
            .set(i64::from(live.breaker_open));
        let zones: std::collections::BTreeSet<&String> = live
            .machines_by_state_and_zone
            .iter()
            .map(|((_, zone), _)| zone)
            .chain(&live.breaker_zones)
            .collect();
        for zone in zones.into_iter().take(MAX_ZONE_SERIES) {
            self.breaker_open
                .get_or_create(&ZoneLabels {
                    zone: Some(zone.clone()),
                })
                .set(i64::from(live.breaker_zones.contains(zone)));
        }
        self.access_policy_behind
            .set(count(live.access_policy_behind));
        if let Some(allocator) = live.allocator {
            self.allocator_allocated.set(count(allocator.allocated));
            self.allocator_resident.set(count(allocator.resident));
            self.allocator_retained.set(count(allocator.retained));
        }
        let mut text = String::new();
        if let Ok(registry) = self.registry.lock() {
            if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
                text.clear();
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_gauges_are_replaced_at_each_scrape() {
        let metrics = ServerMetrics::new();
        metrics.record_rpc("/flotte.v1.Machines/ListMachines", "0", 0.002);
        metrics.store.writes.inc();
        let first = metrics.encode(&LiveGauges {
            machines_by_state_and_zone: vec![(("operational".into(), "dc1".into()), 2)],
            connected: 2,
            on_old_images: 1,
            ..LiveGauges::default()
        });
        assert!(
            first.contains("flotte_machines{state=\"operational\",zone=\"dc1\"} 2"),
            "{first}"
        );
        assert!(first.contains("flotte_connected_agents 2"), "{first}");
        assert!(first.contains("flotte_machines_on_old_images 1"), "{first}");
        assert!(first.contains("flotte_store_writes_total 1"), "{first}");
        assert!(first.contains("flotte_rpc_requests_total{method=\"/flotte.v1.Machines/ListMachines\",code=\"0\"} 1"), "{first}");
        let second = metrics.encode(&LiveGauges {
            machines_by_state_and_zone: vec![(("down".into(), "dc1".into()), 1)],
            ..LiveGauges::default()
        });
        assert!(
            !second.contains("state=\"operational\""),
            "stale series must go: {second}"
        );
        assert!(second.contains("flotte_connected_agents 0"));
        assert!(second.contains("flotte_machines_on_old_images 0"));
    }

    #[test]
    fn rollouts_breaker_and_access_gauges_have_bounded_labels() {
        let metrics = ServerMetrics::new();
        let zones: Vec<((String, String), i64)> = (0..MAX_ZONE_SERIES + 10)
            .map(|index| (("operational".to_owned(), format!("zone-{index:03}")), 1))
            .collect();
        let text = metrics.encode(&LiveGauges {
            machines_by_state_and_zone: zones,
            rollouts_by_state: Some(vec![("running", 1), ("failed", 2)]),
            breaker_open: true,
            breaker_zones: vec!["zone-001".to_owned()],
            access_policy_behind: 3,
            ..LiveGauges::default()
        });
        for expected in [
            "flotte_rollouts{state=\"running\"} 1",
            "flotte_rollouts{state=\"failed\"} 2",
            "flotte_remediation_breaker_open{zone=\"\"} 1",
            "flotte_remediation_breaker_open{zone=\"zone-001\"} 1",
            "flotte_remediation_breaker_open{zone=\"zone-000\"} 0",
            "flotte_access_policy_behind 3",
        ] {
            assert!(text.contains(expected), "{expected} missing from {text}");
        }
        let zone_series = text
            .lines()
            .filter(|line| line.starts_with("flotte_remediation_breaker_open{zone=\"zone"))
            .count();
        assert_eq!(zone_series, MAX_ZONE_SERIES, "{text}");
        // Unreadable rollouts keep their last values; a closed breaker says 0.
        let later = metrics.encode(&LiveGauges::default());
        assert!(
            later.contains("flotte_rollouts{state=\"failed\"} 2"),
            "{later}"
        );
        assert!(
            later.contains("flotte_remediation_breaker_open{zone=\"\"} 0"),
            "{later}"
        );
        assert!(!later.contains("zone=\"zone-001\""), "{later}");
    }
}
