//! The server's Prometheus metrics: machines by state and zone, connected
//! agents, RPC counts and latencies, store writes, transitions, alerts and
//! image bytes served.
//! Gauges derived from live state are refreshed when scraped, so no hot path
//! pays for them.

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

/// Cheap to clone: every field shares its atomics.
#[derive(Clone)]
pub struct ServerMetrics {
    registry: Arc<Mutex<Registry>>,
    machines: Family<StateZoneLabels, Gauge>,
    connected_agents: Gauge,
    machines_on_old_images: Gauge,
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

    /// Encodes every metric after refreshing the live gauges from
    /// `machines_by_state_and_zone`, `connected` and `on_old_images`.
    pub fn encode(
        &self,
        machines_by_state_and_zone: &[((String, String), i64)],
        connected: usize,
        on_old_images: u64,
    ) -> String {
        self.machines_on_old_images
            .set(i64::try_from(on_old_images).unwrap_or(i64::MAX));
        self.machines.clear();
        for ((state, zone), count) in machines_by_state_and_zone {
            self.machines
                .get_or_create(&StateZoneLabels {
                    state: state.clone(),
                    zone: zone.clone(),
                })
                .set(*count);
        }
        self.connected_agents
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
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
        let first = metrics.encode(&[(("operational".into(), "dc1".into()), 2)], 2, 1);
        assert!(
            first.contains("flotte_machines{state=\"operational\",zone=\"dc1\"} 2"),
            "{first}"
        );
        assert!(first.contains("flotte_connected_agents 2"), "{first}");
        assert!(first.contains("flotte_machines_on_old_images 1"), "{first}");
        assert!(first.contains("flotte_store_writes_total 1"), "{first}");
        assert!(first.contains("flotte_rpc_requests_total{method=\"/flotte.v1.Machines/ListMachines\",code=\"0\"} 1"), "{first}");
        let second = metrics.encode(&[(("down".into(), "dc1".into()), 1)], 0, 0);
        assert!(
            !second.contains("state=\"operational\""),
            "stale series must go: {second}"
        );
        assert!(second.contains("flotte_connected_agents 0"));
        assert!(second.contains("flotte_machines_on_old_images 0"));
    }
}
