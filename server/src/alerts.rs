//! Alerts: JSON POSTs to the webhooks of the server config (each in its own
//! format, see `alert_payloads`), over `http://` or `https://`, one queue and
//! one worker per webhook so that a slow or failing receiver delays only itself.
//!
//! `publish` never waits: a full queue drops the alert (counted, logged).
//! Each alert is retried with exponential backoff, in order, before the next
//! one is sent, so a receiver sees events in the order they happened.

use std::time::{Duration, SystemTime};

use flotte_proto::http::{request, HttpEndpoint, OutgoingRequest};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::alert_payloads::{payload, WebhookFormat};
use crate::metrics::ServerMetrics;

/// Alerts waiting per webhook before new ones are dropped.
const QUEUE_DEPTH: usize = 1024;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// A receiver's answer is not used beyond its status: read little of it.
const RESPONSE_BODY_BYTES: usize = 256;

/// A validated webhook target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    pub endpoint: HttpEndpoint,
    pub format: WebhookFormat,
    /// Sent as Alertmanager's `generatorURL` (a link back to the fleet).
    pub generator_url: Option<String>,
    pub timeout: Duration,
    pub max_attempts: u32,
}

/// What is posted: `kind` says which event, `event` carries its fields.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Alert {
    pub kind: &'static str,
    #[serde(flatten)]
    pub event: serde_json::Value,
}

#[derive(Debug, Clone, Default)]
pub struct AlertDispatcher {
    queues: Vec<(String, mpsc::Sender<(Alert, SystemTime)>)>,
    metrics: Option<ServerMetrics>,
}

impl AlertDispatcher {
    /// Starts one worker per target; workers stop at `shutdown`.
    pub fn start(
        targets: Vec<WebhookTarget>,
        metrics: ServerMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let queues = targets
            .into_iter()
            .map(|target| {
                let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
                let name = target.endpoint.url.to_string();
                tokio::spawn(deliver(target, receiver, metrics.clone(), shutdown.clone()));
                (name, sender)
            })
            .collect();
        AlertDispatcher {
            queues,
            metrics: Some(metrics),
        }
    }

    /// Queues `alert`, stamped with the time now, for every webhook without
    /// waiting.
    pub fn publish(&self, alert: &Alert) {
        let at = SystemTime::now();
        for (name, queue) in &self.queues {
            if queue.try_send((alert.clone(), at)).is_err() {
                tracing::warn!(webhook = %name, kind = alert.kind, "alert queue full; alert dropped");
                if let Some(metrics) = &self.metrics {
                    metrics.record_alert(false);
                }
            }
        }
    }
}

async fn deliver(
    target: WebhookTarget,
    mut queue: mpsc::Receiver<(Alert, SystemTime)>,
    metrics: ServerMetrics,
    shutdown: CancellationToken,
) {
    loop {
        let (alert, at) = tokio::select! {
            () = shutdown.cancelled() => return,
            alert = queue.recv() => match alert {
                Some(alert) => alert,
                None => return,
            },
        };
        let body = payload(target.format, &alert, at, target.generator_url.as_deref());
        let body = match serde_json::to_vec(&body) {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(%error, "cannot encode alert");
                continue;
            }
        };
        let mut delay = FIRST_RETRY_DELAY;
        let mut delivered = false;
        for attempt in 1..=target.max_attempts {
            let post = OutgoingRequest::post("application/json", body.clone());
            match request(&target.endpoint, post, target.timeout, RESPONSE_BODY_BYTES).await {
                Ok(response) if (200..300).contains(&response.status) => {
                    delivered = true;
                    break;
                }
                Ok(response) => {
                    tracing::warn!(url = %target.endpoint.url, answer = %response.status_line(), attempt, "webhook refused alert")
                }
                Err(error) => {
                    tracing::warn!(%error, attempt, "webhook unreachable")
                }
            }
            if attempt < target.max_attempts {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
        if !delivered {
            tracing::error!(url = %target.endpoint.url, kind = alert.kind, "alert not delivered after every attempt");
        }
        metrics.record_alert(delivered);
    }
}
