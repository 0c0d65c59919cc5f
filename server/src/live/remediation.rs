//! The remediation loop: every `interval`, read machines, quarantines and
//! events, ask `remediation::next`, apply its actions, publish the breaker.
//! Thin on purpose: every choice is in the pure decision.

use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::alerts::Alert;
use crate::domain::health::MachineState;
use crate::domain::repair::new_quarantine;
use crate::domain::repair::remediation::{next, Action, Decision, MachineView};
use crate::live::providers::{Providers, ReplacementRequest};
use crate::live::repair_state::RemediationStatus;
use crate::store::repair::{RemediationEventRecord, RemediationState};
use crate::store::replicas::Fence;
use crate::store::StoreError;
use crate::ServerState;

/// Who automatic quarantines are recorded as.
pub const REMEDIATION_ACTOR: &str = "remediation";

/// Runs until `shutdown`; does nothing but keep the status if no rule is configured.
pub async fn run_remediation(state: Arc<ServerState>, shutdown: CancellationToken) {
    let settings = state.config.remediation.clone();
    if !settings.enabled() {
        return;
    }
    let providers = Arc::new(Providers::from_settings(&settings.providers));
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The leader term these rounds decide under, and since when machines'
    // unhealthiness counts (see `remediation::next`): from the start of
    // the term (a new leader knows nothing of what the breaker covered
    // before), then from the last round the breaker was open.
    let mut settled: Option<(i64, i64)> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let Some(fence) = state.leadership.fence() else {
            continue; // another replica remediates
        };
        let now = state.clock.now_unix();
        let settled_since = match settled {
            Some((term, since)) if term == fence.term => since,
            _ => now,
        };
        settled = Some((fence.term, settled_since));
        match decide_and_apply(&state, &providers, &fence, settled_since).await {
            Ok(breaker_open) => {
                if breaker_open {
                    settled = Some((fence.term, now));
                }
            }
            Err(error) => tracing::warn!(%error, "remediation round failed"),
        }
    }
    providers.shutdown();
}

/// One round; every write carries `fence`, so that a replica that lost the
/// lead meanwhile changes nothing. Returns whether the breaker is open.
async fn decide_and_apply(
    state: &Arc<ServerState>,
    providers: &Arc<Providers>,
    fence: &Fence,
    settled_since: i64,
) -> Result<bool, StoreError> {
    let machines = state.store.machines().await?;
    let quarantined = crate::live::repair_state::quarantined_ids(state).await?;
    let events = state.repair.store.remediations().await?;
    let tracked = state.health.snapshot();
    let views: Vec<MachineView> = machines
        .iter()
        .map(|machine| {
            let health = tracked.get(&machine.id);
            MachineView {
                id: machine.id,
                hostname: machine.inventory.hostname.clone(),
                zone: machine.zone.clone(),
                labels: machine.labels.clone(),
                state: health.map_or(MachineState::Unknown, |health| health.state),
                since: health.map_or(machine.state_since, |health| health.since),
                quarantined: quarantined.contains(&machine.id),
                retired: machine.retired_at.is_some(),
                enrolled_with_token: machine.enrolled_with_token.clone(),
            }
        })
        .collect();
    let now = state.clock.now_unix();
    let decision: Decision = next(
        &views,
        &events,
        &state.config.remediation,
        now,
        settled_since,
    );
    publish_breaker(state, &decision);
    let breaker_open = decision.breaker.open;
    for action in decision.actions {
        match action {
            Action::Remediate {
                machine_id,
                provider,
                reason,
            } => {
                let Some(view) = views.iter().find(|view| view.id == machine_id) else {
                    continue;
                };
                remediate(state, providers, view, &provider, &reason, now, fence).await?;
            }
            Action::Close {
                event_id,
                replacement,
            } => {
                if let Some(event) = events.iter().find(|event| event.id == event_id) {
                    let closed = RemediationEventRecord {
                        state: RemediationState::Closed,
                        replacement_machine_id: Some(replacement),
                        updated_at: now,
                        ..event.clone()
                    };
                    state
                        .repair
                        .store
                        .update_remediation(&closed, fence)
                        .await?;
                    tracing::info!(event = %event_id, machine = %event.machine_id, %replacement, "remediation closed: the replacement is operational");
                    publish_event(state, &closed);
                }
            }
            Action::Fail { event_id, reason } => {
                if let Some(event) = events.iter().find(|event| event.id == event_id) {
                    fail(state, event, reason, now, fence).await?;
                }
            }
        }
    }
    Ok(breaker_open)
}

fn publish_breaker(state: &ServerState, decision: &Decision) {
    let status = RemediationStatus {
        breaker_open: decision.breaker.open,
        breaker_reasons: decision.breaker.reasons.clone(),
        breaker_zones: decision.breaker.zones_over_share.clone(),
        in_progress: decision.in_progress,
    };
    let previous = state.repair.set_status(status.clone());
    if previous.breaker_open != status.breaker_open {
        if status.breaker_open {
            tracing::warn!(reasons = ?status.breaker_reasons, "remediation breaker open: automatic remediation stopped");
        } else {
            tracing::info!("remediation breaker closed: automatic remediation resumes");
        }
        state.alerts.publish(&Alert {
            kind: "remediation_breaker",
            event: json!({
                "open": status.breaker_open,
                "reasons": status.breaker_reasons,
            }),
        });
    }
}

fn publish_event(state: &ServerState, event: &RemediationEventRecord) {
    state.alerts.publish(&Alert {
        kind: "remediation",
        event: json!({
            "event": event.id,
            "machine": event.machine_id.to_string(),
            "hostname": event.hostname,
            "zone": event.zone,
            "state": event.state.as_str(),
            "reason": event.reason,
            "replacement": event.replacement_machine_id.map(|id| id.to_string()),
            "detail": event.detail,
        }),
    });
}

async fn fail(
    state: &ServerState,
    event: &RemediationEventRecord,
    reason: String,
    now: i64,
    fence: &Fence,
) -> Result<(), StoreError> {
    let failed = RemediationEventRecord {
        state: RemediationState::Failed,
        updated_at: now,
        detail: reason,
        ..event.clone()
    };
    state
        .repair
        .store
        .update_remediation(&failed, fence)
        .await?;
    tracing::warn!(event = %failed.id, machine = %failed.machine_id, detail = %failed.detail, "remediation failed");
    publish_event(state, &failed);
    Ok(())
}

/// Quarantines the machine, records the event with a fresh single-use join
/// token carrying its labels and zone, and asks the provider (in its own
/// task: a slow provider never holds the loop).
async fn remediate(
    state: &Arc<ServerState>,
    providers: &Arc<Providers>,
    machine: &MachineView,
    provider: &str,
    reason: &str,
    now: i64,
    fence: &Fence,
) -> Result<(), StoreError> {
    let ttl = state
        .config
        .remediation
        .replacement_timeout
        .as_secs()
        .max(60);
    let (token_record, token) = match crate::join_tokens::mint_join_token(
        now,
        &state.ca.fingerprint(),
        &machine.labels,
        &machine.zone,
        ttl,
        1,
    ) {
        Ok(minted) => minted,
        Err(error) => {
            tracing::error!(%error, "cannot make a join token for a replacement");
            return Ok(());
        }
    };
    state.store.insert_token(&token_record).await?;
    let quarantine = new_quarantine(
        machine.id,
        format!("remediation: {reason}"),
        REMEDIATION_ACTOR,
        now,
    );
    let event = RemediationEventRecord {
        id: Uuid::new_v4().simple().to_string(),
        machine_id: machine.id,
        hostname: machine.hostname.clone(),
        zone: machine.zone.clone(),
        labels: machine.labels.clone(),
        provider: provider.to_owned(),
        state: RemediationState::Requested,
        reason: reason.to_owned(),
        opened_at: now,
        updated_at: now,
        token_id: token_record.id.clone(),
        replacement_machine_id: None,
        detail: String::new(),
    };
    let updated = state
        .repair
        .store
        .open_remediation(&quarantine, &event, fence)
        .await?;
    tracing::warn!(machine = %machine.id, hostname = %machine.hostname, event = %event.id, %provider, %reason, "remediation: machine quarantined, replacement requested");
    if let Some(machine) = &updated {
        state.publisher.machine_changed(machine).await;
    }
    publish_event(state, &event);
    let request = ReplacementRequest {
        event_id: event.id.clone(),
        machine_id: machine.id.to_string(),
        hostname: machine.hostname.clone(),
        zone: machine.zone.clone(),
        labels: machine.labels.clone(),
        state: machine.state.as_str().to_owned(),
        reason: reason.to_owned(),
        join_token: token.to_string(),
    };
    let state = Arc::clone(state);
    let providers = Arc::clone(providers);
    let provider = provider.to_owned();
    tokio::spawn(async move {
        let outcome = providers.request_replacement(&provider, &request).await;
        let (detail, failed) = match outcome {
            Ok(detail) => (detail, false),
            Err(error) => (format!("provider {provider}: {error}"), true),
        };
        let now = state.clock.now_unix();
        match state
            .repair
            .store
            .annotate_open_remediation(&event.id, &detail, failed, now)
            .await
        {
            Ok(true) if failed => {
                tracing::warn!(event = %event.id, %detail, "remediation failed");
                publish_event(
                    &state,
                    &RemediationEventRecord {
                        state: RemediationState::Failed,
                        detail,
                        updated_at: now,
                        ..event
                    },
                );
            }
            Ok(_) => tracing::info!(event = %event.id, %detail, "replacement requested"),
            Err(error) => tracing::error!(%error, "cannot record the provider's answer"),
        }
    });
    Ok(())
}
