//! SQLite implementation of [`ReplicaStore`]. One process owns a SQLite
//! file, so this is the degenerate case of the replica set: one replica,
//! always able to lead, and a change feed that is an in-process channel.
//! The rows are still written, so that `status` shows the one replica and
//! the sessions it holds the same way as with PostgreSQL.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, OptionalExtension};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::SqliteStore;
use crate::store::replicas::{
    FeedEvent, Fence, ReplicaRegistration, ReplicaStatus, ReplicaStore, FEED_MESSAGE_MAX_BYTES,
};
use crate::store::{StoreError, UnixSeconds};

/// Milliseconds since the epoch by this process's clock.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

/// Whether `fence` holds a running lease, inside an open transaction.
pub(super) fn fence_holds(
    connection: &rusqlite::Connection,
    fence: &Fence,
) -> Result<(), StoreError> {
    let held = connection
        .query_row(
            "SELECT 1 FROM leadership WHERE singleton = 1 AND holder = ?1 AND term = ?2
                AND lease_expires_at_ms > ?3",
            params![fence.holder, fence.term, now_ms()],
            |_| Ok(()),
        )
        .optional()?;
    held.ok_or_else(|| StoreError::Fenced {
        holder: fence.holder.clone(),
        term: fence.term,
    })
}

#[async_trait::async_trait]
impl ReplicaStore for SqliteStore {
    async fn renew_replica(
        &self,
        replica: &ReplicaRegistration,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let replica = replica.clone();
        self.with_connection(move |connection| {
            let now = now_ms();
            connection.execute(
                "INSERT INTO replicas (name, zone, address, started_at, renewed_at_ms,
                    lease_expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (name) DO UPDATE SET zone = ?2, address = ?3, started_at = ?4,
                    renewed_at_ms = ?5, lease_expires_at_ms = ?6",
                params![
                    replica.name,
                    replica.zone,
                    replica.address,
                    replica.started_at,
                    now,
                    now.saturating_add(lease_ms(lease)),
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn remove_replica(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            transaction.execute("DELETE FROM sessions WHERE replica = ?1", [&name])?;
            transaction.execute("DELETE FROM replicas WHERE name = ?1", [&name])?;
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    async fn replicas(&self) -> Result<Vec<ReplicaStatus>, StoreError> {
        self.with_connection(|connection| {
            let now = now_ms();
            let leader: Option<String> = connection
                .query_row(
                    "SELECT holder FROM leadership WHERE singleton = 1 AND lease_expires_at_ms > ?1",
                    [now],
                    |row| row.get(0),
                )
                .optional()?;
            let mut statement = connection.prepare(
                "SELECT name, zone, address, started_at, renewed_at_ms, lease_expires_at_ms,
                    (SELECT COUNT(*) FROM sessions WHERE sessions.replica = replicas.name) AS held
                 FROM replicas ORDER BY name",
            )?;
            let rows = statement.query_map([], |row| {
                let name: String = row.get("name")?;
                let renewed: i64 = row.get("renewed_at_ms")?;
                let expires: i64 = row.get("lease_expires_at_ms")?;
                let held: i64 = row.get("held")?;
                Ok(ReplicaStatus {
                    leader: leader.as_deref() == Some(name.as_str()),
                    registration: ReplicaRegistration {
                        name,
                        zone: row.get("zone")?,
                        address: row.get("address")?,
                        started_at: row.get("started_at")?,
                    },
                    lease_age_ms: now.saturating_sub(renewed).max(0),
                    live: expires > now,
                    sessions: u64::try_from(held).unwrap_or(0),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn claim_session(
        &self,
        machine: Uuid,
        replica: &str,
        since: UnixSeconds,
    ) -> Result<(), StoreError> {
        let replica = replica.to_owned();
        self.with_connection(move |connection| {
            connection.execute(
                "INSERT INTO sessions (machine_id, replica, since) VALUES (?1, ?2, ?3)
                 ON CONFLICT (machine_id) DO UPDATE SET replica = ?2, since = ?3",
                params![machine.to_string(), replica, since],
            )?;
            Ok(())
        })
        .await
    }

    async fn release_session(&self, machine: Uuid, replica: &str) -> Result<(), StoreError> {
        let replica = replica.to_owned();
        self.with_connection(move |connection| {
            connection.execute(
                "DELETE FROM sessions WHERE machine_id = ?1 AND replica = ?2",
                params![machine.to_string(), replica],
            )?;
            Ok(())
        })
        .await
    }

    async fn release_sessions_of(&self, replica: &str) -> Result<(), StoreError> {
        let replica = replica.to_owned();
        self.with_connection(move |connection| {
            connection.execute("DELETE FROM sessions WHERE replica = ?1", [replica])?;
            Ok(())
        })
        .await
    }

    async fn live_session_holders(&self) -> Result<HashMap<Uuid, String>, StoreError> {
        self.with_connection(|connection| {
            let mut statement = connection.prepare(
                "SELECT sessions.machine_id, sessions.replica FROM sessions
                 JOIN replicas ON replicas.name = sessions.replica
                 WHERE replicas.lease_expires_at_ms > ?1",
            )?;
            let rows = statement.query_map([now_ms()], |row| {
                let machine: String = row.get(0)?;
                let replica: String = row.get(1)?;
                Ok((machine, replica))
            })?;
            let mut holders = HashMap::new();
            for row in rows {
                let (machine, replica) = row?;
                let machine = Uuid::parse_str(&machine).map_err(|error| {
                    StoreError::Corrupt(format!("sessions.machine_id: {error}"))
                })?;
                holders.insert(machine, replica);
            }
            Ok(holders)
        })
        .await
    }

    async fn try_lead(&self, replica: &str, lease: Duration) -> Result<Option<Fence>, StoreError> {
        let replica = replica.to_owned();
        self.with_connection(move |connection| {
            let now = now_ms();
            let expires = now.saturating_add(lease_ms(lease));
            let term: Option<i64> = connection
                .query_row(
                    "UPDATE leadership SET
                        term = CASE WHEN holder = ?1 AND lease_expires_at_ms > ?2 THEN term
                                    ELSE term + 1 END,
                        holder = ?1, lease_expires_at_ms = ?3
                     WHERE singleton = 1 AND (holder = ?1 OR lease_expires_at_ms <= ?2)
                     RETURNING term",
                    params![replica, now, expires],
                    |row| row.get(0),
                )
                .optional()?;
            Ok(term.map(|term| Fence {
                holder: replica,
                term,
            }))
        })
        .await
    }

    async fn step_down(&self, fence: &Fence) -> Result<(), StoreError> {
        let fence = fence.clone();
        self.with_connection(move |connection| {
            connection.execute(
                "UPDATE leadership SET lease_expires_at_ms = 0
                 WHERE singleton = 1 AND holder = ?1 AND term = ?2",
                params![fence.holder, fence.term],
            )?;
            Ok(())
        })
        .await
    }

    async fn announce(&self, message: &str) -> Result<(), StoreError> {
        if message.len() > FEED_MESSAGE_MAX_BYTES {
            return Err(StoreError::Backend(format!(
                "a change-feed message of {} bytes is over the {FEED_MESSAGE_MAX_BYTES}-byte limit",
                message.len()
            )));
        }
        // No subscriber is not an error (nothing caches anything yet).
        let _ = self.feed.send(FeedEvent::Message(message.to_owned()));
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.feed.subscribe()
    }
}
