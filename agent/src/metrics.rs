//! The agent's Prometheus metrics: check results and durations, report and
//! session failures. Served as text on `/metrics` when `metrics_listen` is set.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckRunLabels {
    check: String,
    result: &'static str,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~16 s: from a local TCP connect to a slow exec check.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

/// Cheap to clone: every field shares its atomics.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Arc<Mutex<Registry>>,
    check_healthy: Family<CheckLabels, Gauge>,
    check_runs: Family<CheckRunLabels, Counter>,
    check_duration: Family<CheckLabels, Histogram, fn() -> Histogram>,
    report_failures: Counter,
    session_failures: Counter,
    session_connected: Gauge,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flotte_agent");
        let check_healthy = Family::<CheckLabels, Gauge>::default();
        registry.register(
            "check_healthy",
            "Smoothed verdict of each health check (1 healthy, 0 unhealthy)",
            check_healthy.clone(),
        );
        let check_runs = Family::<CheckRunLabels, Counter>::default();
        registry.register(
            "check_runs",
            "Health check runs by raw result",
            check_runs.clone(),
        );
        let check_duration =
            Family::<CheckLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        registry.register_with_unit(
            "check_duration",
            "Duration of health check runs",
            prometheus_client::registry::Unit::Seconds,
            check_duration.clone(),
        );
        let report_failures = Counter::default();
        registry.register(
            "report_failures",
            "Reports that could not be sent to the server",
            report_failures.clone(),
        );
        let session_failures = Counter::default();
        registry.register(
            "session_failures",
            "Sessions with the server that failed or were refused",
            session_failures.clone(),
        );
        let session_connected = Gauge::default();
        registry.register(
            "session_connected",
            "1 while a session with the server is established",
            session_connected.clone(),
        );
        AgentMetrics {
            registry: Arc::new(Mutex::new(registry)),
            check_healthy,
            check_runs,
            check_duration,
            report_failures,
            session_failures,
            session_connected,
        }
    }

    pub fn record_check(&self, check: &str, passed: bool, healthy: bool, duration: Duration) {
        let labels = CheckLabels {
            check: check.to_owned(),
        };
        self.check_healthy
            .get_or_create(&labels)
            .set(i64::from(healthy));
        self.check_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
        self.check_runs
            .get_or_create(&CheckRunLabels {
                check: check.to_owned(),
                result: if passed { "pass" } else { "fail" },
            })
            .inc();
    }

    pub fn record_report_failure(&self) {
        self.report_failures.inc();
    }

    pub fn record_session_failure(&self) {
        self.session_failures.inc();
    }

    pub fn set_connected(&self, connected: bool) {
        self.session_connected.set(i64::from(connected));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
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
    fn encodes_check_results_by_prometheus_conventions() {
        let metrics = AgentMetrics::new();
        metrics.record_check("web", true, true, Duration::from_millis(3));
        metrics.record_check("web", false, true, Duration::from_millis(5));
        metrics.record_report_failure();
        let text = metrics.encode();
        for expected in [
            "flotte_agent_check_healthy{check=\"web\"} 1",
            "flotte_agent_check_runs_total{check=\"web\",result=\"pass\"} 1",
            "flotte_agent_check_runs_total{check=\"web\",result=\"fail\"} 1",
            "flotte_agent_check_duration_seconds_count{check=\"web\"} 2",
            "flotte_agent_report_failures_total 1",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }
}
