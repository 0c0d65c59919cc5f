//! Server-sent event streams that keep a page's live section current
//! without a reload, each fed by one of the API's watch streams.
//!
//! A message's data is the section's new HTML, rendered (and escaped) by the
//! same function as the page, so the browser only swaps the section. The
//! fleet follows `Machines/Watch`: a transition (or, every few seconds, a
//! quarantine or a retirement, which are not transitions) re-lists the
//! machines and sends the section if it changed. A rollout follows
//! `WatchRollout` and ends with an `end` event once the rollout is final.
//! A `problem` event carries a failure in words; the browser reconnects by
//! itself when a stream ends otherwise.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotte_proto::v1::machines_client::MachinesClient;
use flotte_proto::v1::rollouts_client::RolloutsClient;
use flotte_proto::v1::{RolloutRequest, WatchMachinesRequest};
use hyper::Response;
use tokio::sync::mpsc;

use super::http::{streamed, Body, UiError};
use super::{pages, Dashboard};

/// Live pages open at once.
pub const MAX_EVENT_STREAMS: usize = 16;
/// Transitions arriving this close together cost one re-listing.
const COALESCE: Duration = Duration::from_millis(250);
/// How often the fleet is re-listed without a transition (quarantines and
/// retirements are not transitions), and a keep-alive sent if unchanged…
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// …or less often on a large fleet: the time between two listings is at
/// least this many times what the last one took, so an open page never
/// keeps the server listing more than a tenth of the time.
const RESYNC_COST_FACTOR: u32 = 10;

/// When to re-list next, given how long the last listing took.
fn next_resync(listing_took: Duration) -> Duration {
    RESYNC_INTERVAL.max(listing_took.saturating_mul(RESYNC_COST_FACTOR))
}

/// One server-sent event: its `event:` name (none: a plain message) and its
/// data, one `data:` line per line so that no text can end the event early.
pub fn event_message(event: Option<&str>, data: &str) -> Bytes {
    let mut message = String::with_capacity(data.len() + 32);
    if let Some(event) = event {
        message.push_str("event: ");
        message.push_str(event);
        message.push('\n');
    }
    for line in data.split(['\n', '\r']) {
        message.push_str("data: ");
        message.push_str(line);
        message.push('\n');
    }
    message.push('\n');
    Bytes::from(message)
}

/// A comment line: keeps the connection open and shows a closed one.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

fn open_stream(
    dashboard: &Arc<Dashboard>,
) -> Result<
    (
        tokio::sync::OwnedSemaphorePermit,
        mpsc::Sender<Bytes>,
        Response<Body>,
    ),
    UiError,
> {
    let permit = Arc::clone(&dashboard.event_streams)
        .try_acquire_owned()
        .map_err(|_| UiError::TooManyStreams(MAX_EVENT_STREAMS))?;
    let (sender, receiver) = mpsc::channel(4);
    Ok((permit, sender, streamed("text/event-stream", receiver)))
}

/// `GET /events/fleet?selector=…`: the fleet section, live.
pub fn fleet(dashboard: &Arc<Dashboard>, selector: &str) -> Result<Response<Body>, UiError> {
    let (permit, sender, response) = open_stream(dashboard)?;
    let dashboard = Arc::clone(dashboard);
    let selector = selector.to_owned();
    tokio::spawn(async move {
        follow_fleet(&dashboard, &selector, &sender).await;
        drop(permit);
    });
    Ok(response)
}

async fn follow_fleet(dashboard: &Dashboard, selector: &str, sender: &mpsc::Sender<Bytes>) {
    let watch = MachinesClient::new(dashboard.channel.clone())
        .watch(WatchMachinesRequest {
            selector: selector.to_owned(),
        })
        .await;
    let mut events = match watch {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let problem = dashboard.rpc_failure(status).to_string();
            let _ = sender.send(event_message(Some("problem"), &problem)).await;
            return;
        }
    };
    let mut last_sent = String::new();
    let mut resync_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = sender.closed() => return,
            event = events.message() => {
                if !matches!(event, Ok(Some(_))) {
                    return;
                }
                let until = tokio::time::Instant::now() + COALESCE;
                while let Ok(Ok(Some(_))) = tokio::time::timeout_at(until, events.message()).await {}
            }
            () = tokio::time::sleep_until(resync_at) => {}
        }
        let started = tokio::time::Instant::now();
        let listed = pages::fleet::live_section(dashboard, selector).await;
        resync_at = tokio::time::Instant::now() + next_resync(started.elapsed());
        let message = match listed {
            Ok(section) => {
                let section = section.into_string();
                if section == last_sent {
                    Bytes::from_static(KEEP_ALIVE)
                } else {
                    let message = event_message(None, &section);
                    last_sent = section;
                    message
                }
            }
            Err(error) => event_message(Some("problem"), &error.to_string()),
        };
        if sender.send(message).await.is_err() {
            return;
        }
    }
}

/// `GET /events/rollouts/ID`: the rollout section, live until it is final.
pub fn rollout(dashboard: &Arc<Dashboard>, id: &str) -> Result<Response<Body>, UiError> {
    let (permit, sender, response) = open_stream(dashboard)?;
    let dashboard = Arc::clone(dashboard);
    let id = id.to_owned();
    tokio::spawn(async move {
        follow_rollout(&dashboard, &id, &sender).await;
        drop(permit);
    });
    Ok(response)
}

async fn follow_rollout(dashboard: &Dashboard, id: &str, sender: &mpsc::Sender<Bytes>) {
    let watch = RolloutsClient::new(dashboard.channel.clone())
        .watch_rollout(RolloutRequest { id: id.to_owned() })
        .await;
    let mut snapshots = match watch {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let problem = dashboard.rpc_failure(status).to_string();
            let _ = sender.send(event_message(Some("problem"), &problem)).await;
            return;
        }
    };
    loop {
        let snapshot = tokio::select! {
            () = sender.closed() => return,
            snapshot = snapshots.message() => snapshot,
        };
        let message = match snapshot {
            Ok(Some(info)) => {
                let section = pages::rollouts::live_section(&dashboard.operator, &info);
                event_message(None, &section.into_string())
            }
            // The server ends the watch once the rollout is final.
            Ok(None) => {
                let _ = sender.send(event_message(Some("end"), "final")).await;
                return;
            }
            Err(status) => {
                let problem = dashboard.rpc_failure(status).to_string();
                let _ = sender.send(event_message(Some("problem"), &problem)).await;
                return;
            }
        };
        if sender.send(message).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_listing_spaces_the_next_ones_out() {
        assert_eq!(next_resync(Duration::from_millis(20)), RESYNC_INTERVAL);
        assert_eq!(
            next_resync(Duration::from_millis(700)),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn an_event_keeps_every_line_as_data_so_no_text_can_end_it_early() {
        let message = event_message(None, "<p>a</p>\n\ndata: forged\r\nevent: end");
        let text = std::str::from_utf8(&message).unwrap();
        assert_eq!(
            text,
            "data: <p>a</p>\ndata: \ndata: data: forged\ndata: \ndata: event: end\n\n"
        );
        let named = event_message(Some("problem"), "down");
        assert_eq!(&named[..], b"event: problem\ndata: down\n\n");
    }
}
