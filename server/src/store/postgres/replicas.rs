//! PostgreSQL implementation of [`ReplicaStore`]: the `replicas`,
//! `sessions` and `leadership` tables, with every lease measured by the
//! database's clock, and the change feed as `LISTEN`/`NOTIFY` on the
//! channel `flotte_changes`.
//!
//! The feed has a connection of its own, opened at the first subscription
//! and reopened (with backoff) whenever it is lost; each (re)connection is
//! followed by [`FeedEvent::Resynchronise`], because notifications sent
//! while it was down are gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

use super::{column, lock_keys, PostgresStore};
use crate::store::replicas::{
    FeedEvent, Fence, ReplicaRegistration, ReplicaStatus, ReplicaStore, FEED_BUFFER,
    FEED_MESSAGE_MAX_BYTES,
};
use crate::store::{StoreError, UnixSeconds};

/// The NOTIFY channel every replica listens on.
const CHANNEL: &str = "flotte_changes";

/// The database's clock, in milliseconds since the epoch (`clock_timestamp`
/// moves within a transaction, unlike `now()`).
pub(super) const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// How long the feed waits before reconnecting after losing its connection.
const FEED_RECONNECT_DELAY: Duration = Duration::from_millis(500);

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

/// The subscribers' channel and whether the listening task was started.
#[derive(Clone)]
pub(super) struct ChangeFeed {
    sender: broadcast::Sender<FeedEvent>,
    started: Arc<AtomicBool>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        ChangeFeed {
            sender: broadcast::channel(FEED_BUFFER).0,
            started: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Listens on [`CHANNEL`] until every subscriber is gone, reconnecting when
/// the connection is lost.
async fn listen(
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    sender: broadcast::Sender<FeedEvent>,
) {
    let mut first = true;
    while sender.receiver_count() > 0 {
        let outcome = match &tls {
            Some(tls) => listen_once(&config, tls.clone(), &sender, first).await,
            None => listen_once(&config, NoTls, &sender, first).await,
        };
        match outcome {
            Ok(()) => {}
            Err(error) => tracing::warn!(%error, "change feed connection lost; reconnecting"),
        }
        first = false;
        tokio::time::sleep(FEED_RECONNECT_DELAY).await;
    }
}

/// One connection's life: `LISTEN`, then every notification until it fails.
async fn listen_once<Tls>(
    config: &tokio_postgres::Config,
    tls: Tls,
    sender: &broadcast::Sender<FeedEvent>,
    first: bool,
) -> Result<(), StoreError>
where
    Tls: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    Tls::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await?;
    let (messages, mut received) = futures::channel::mpsc::unbounded();
    // The connection object yields notifications only while it is polled;
    // polling it also drives the client's queries.
    let driver = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |context| connection.poll_message(context));
        while let Some(message) = stream.next().await {
            match message {
                Ok(message) => {
                    if messages.unbounded_send(message).is_err() {
                        return Ok(());
                    }
                }
                Err(error) => return Err(StoreError::from(error)),
            }
        }
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // Whatever was announced before this LISTEN (while the connection was
    // down, or between the subscription and now) is lost: reload.
    if !first {
        tracing::info!("change feed reconnected; resynchronising");
    }
    let _ = sender.send(FeedEvent::Resynchronise);
    while let Some(message) = received.next().await {
        if let AsyncMessage::Notification(notification) = message {
            if sender
                .send(FeedEvent::Message(notification.payload().to_owned()))
                .is_err()
            {
                break; // nobody listens any more
            }
        }
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(error) => Err(StoreError::Task(error.to_string())),
    }
}

/// Refuses the transaction's leader-only write unless `fence` holds a
/// running lease; the row lock keeps a new term from starting until commit.
pub(super) async fn fence_holds(
    transaction: &deadpool_postgres::Transaction<'_>,
    fence: &Fence,
) -> Result<(), StoreError> {
    let held = transaction
        .query_opt(
            &format!(
                "SELECT 1 FROM leadership WHERE singleton = 1 AND holder = $1 AND term = $2
                    AND lease_expires_at_ms > {NOW_MS} FOR SHARE"
            ),
            &[&fence.holder, &fence.term],
        )
        .await?;
    held.map(|_| ()).ok_or_else(|| StoreError::Fenced {
        holder: fence.holder.clone(),
        term: fence.term,
    })
}

#[async_trait::async_trait]
impl ReplicaStore for PostgresStore {
    async fn renew_replica(
        &self,
        replica: &ReplicaRegistration,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                &format!(
                    "INSERT INTO replicas (name, zone, address, started_at, renewed_at_ms,
                        lease_expires_at_ms) VALUES ($1, $2, $3, $4, {NOW_MS}, {NOW_MS} + $5)
                     ON CONFLICT (name) DO UPDATE SET zone = $2, address = $3, started_at = $4,
                        renewed_at_ms = {NOW_MS}, lease_expires_at_ms = {NOW_MS} + $5"
                ),
                &[
                    &replica.name,
                    &replica.zone,
                    &replica.address,
                    &replica.started_at,
                    &lease_ms(lease),
                ],
            )
            .await?;
        Ok(())
    }

    async fn remove_replica(&self, name: &str) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        transaction
            .execute("DELETE FROM sessions WHERE replica = $1", &[&name])
            .await?;
        transaction
            .execute("DELETE FROM replicas WHERE name = $1", &[&name])
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn replicas(&self) -> Result<Vec<ReplicaStatus>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT name, zone, address, started_at,
                        {NOW_MS} - renewed_at_ms AS lease_age_ms,
                        lease_expires_at_ms > {NOW_MS} AS live,
                        EXISTS (SELECT 1 FROM leadership WHERE singleton = 1
                            AND holder = replicas.name AND lease_expires_at_ms > {NOW_MS}) AS leader,
                        (SELECT COUNT(*) FROM sessions WHERE sessions.replica = replicas.name) AS held
                     FROM replicas ORDER BY name"
                ),
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let held: i64 = column(row, "held")?;
                let lease_age_ms: i64 = column(row, "lease_age_ms")?;
                Ok(ReplicaStatus {
                    registration: ReplicaRegistration {
                        name: column(row, "name")?,
                        zone: column(row, "zone")?,
                        address: column(row, "address")?,
                        started_at: column(row, "started_at")?,
                    },
                    lease_age_ms: lease_age_ms.max(0),
                    live: column(row, "live")?,
                    leader: column(row, "leader")?,
                    sessions: u64::try_from(held).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn claim_session(
        &self,
        machine: Uuid,
        replica: &str,
        since: UnixSeconds,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO sessions (machine_id, replica, since) VALUES ($1, $2, $3)
                 ON CONFLICT (machine_id) DO UPDATE SET replica = $2, since = $3",
                &[&machine.to_string(), &replica, &since],
            )
            .await?;
        Ok(())
    }

    async fn release_session(&self, machine: Uuid, replica: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM sessions WHERE machine_id = $1 AND replica = $2",
                &[&machine.to_string(), &replica],
            )
            .await?;
        Ok(())
    }

    async fn release_sessions_of(&self, replica: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM sessions WHERE replica = $1", &[&replica])
            .await?;
        Ok(())
    }

    async fn live_session_holders(&self) -> Result<HashMap<Uuid, String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT sessions.machine_id, sessions.replica FROM sessions
                     JOIN replicas ON replicas.name = sessions.replica
                     WHERE replicas.lease_expires_at_ms > {NOW_MS}"
                ),
                &[],
            )
            .await?;
        let mut holders = HashMap::with_capacity(rows.len());
        for row in &rows {
            holders.insert(
                super::uuid_column(row, "machine_id")?,
                column(row, "replica")?,
            );
        }
        Ok(holders)
    }

    async fn try_lead(&self, replica: &str, lease: Duration) -> Result<Option<Fence>, StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        super::lock_rule(&transaction, lock_keys::LEADERSHIP).await?;
        let row = transaction
            .query_opt(
                &format!(
                    "UPDATE leadership SET
                        term = CASE WHEN holder = $1 AND lease_expires_at_ms > {NOW_MS} THEN term
                                    ELSE term + 1 END,
                        holder = $1, lease_expires_at_ms = {NOW_MS} + $2
                     WHERE singleton = 1 AND (holder = $1 OR lease_expires_at_ms <= {NOW_MS})
                     RETURNING term"
                ),
                &[&replica, &lease_ms(lease)],
            )
            .await?;
        transaction.commit().await?;
        row.map(|row| {
            Ok(Fence {
                holder: replica.to_owned(),
                term: column(&row, "term")?,
            })
        })
        .transpose()
    }

    async fn step_down(&self, fence: &Fence) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE leadership SET lease_expires_at_ms = 0
                 WHERE singleton = 1 AND holder = $1 AND term = $2",
                &[&fence.holder, &fence.term],
            )
            .await?;
        Ok(())
    }

    async fn announce(&self, message: &str) -> Result<(), StoreError> {
        if message.len() > FEED_MESSAGE_MAX_BYTES {
            return Err(StoreError::Backend(format!(
                "a change-feed message of {} bytes is over the {FEED_MESSAGE_MAX_BYTES}-byte limit",
                message.len()
            )));
        }
        let client = self.client().await?;
        client
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &message])
            .await?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        let receiver = self.feed.sender.subscribe();
        if !self.feed.started.swap(true, Ordering::SeqCst) {
            tokio::spawn(listen(
                self.config.clone(),
                self.tls.clone(),
                self.feed.sender.clone(),
            ));
        }
        receiver
    }
}
