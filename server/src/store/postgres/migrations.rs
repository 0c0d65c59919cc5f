//! The PostgreSQL schema as numbered migrations (`migrations/V<n>__<name>.sql`,
//! embedded in the binary, numbered like SQLite's: the same schema at the
//! same version), applied by `refinery` at connect in one transaction and
//! recorded in its history table.
//!
//! Replicas may start together: the migration runs under a session
//! advisory lock, so one applies it and the others find it applied. A
//! database whose schema is newer than this binary knows is refused before
//! anything is written, naming both versions.

use tokio_postgres::Client;

use super::lock_keys;
use crate::store::StoreError;

/// Every migration this binary knows, in order. Never edit an applied one
/// (its checksum is recorded): add the next file.
const MIGRATIONS: [(&str, &str); 7] = [
    ("V1__initial", include_str!("migrations/V1__initial.sql")),
    (
        "V2__rollout_machines_by_machine",
        include_str!("migrations/V2__rollout_machines_by_machine.sql"),
    ),
    ("V3__replicas", include_str!("migrations/V3__replicas.sql")),
    (
        "V4__image_verifications",
        include_str!("migrations/V4__image_verifications.sql"),
    ),
    (
        "V5__hardening",
        include_str!("migrations/V5__hardening.sql"),
    ),
    (
        "V6__forensic_bundles",
        include_str!("migrations/V6__forensic_bundles.sql"),
    ),
    (
        "V7__token_times",
        include_str!("migrations/V7__token_times.sql"),
    ),
];

/// The table `refinery` records applied migrations in.
const HISTORY_TABLE: &str = "refinery_schema_history";

/// The schema version this binary writes.
fn latest_version() -> i64 {
    crate::store::latest_migration_version(&MIGRATIONS)
}

fn migration_error(error: refinery::Error) -> StoreError {
    StoreError::Backend(format!("schema migration failed: {error}"))
}

/// Brings the schema to [`latest_version`] under the migrations' advisory
/// lock, or refuses a newer one.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&lock_keys::MIGRATIONS])
        .await?;
    let migrated = migrate_locked(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&lock_keys::MIGRATIONS])
        .await;
    migrated?;
    unlocked?;
    Ok(())
}

async fn migrate_locked(client: &mut Client) -> Result<(), StoreError> {
    let migrations = MIGRATIONS
        .iter()
        .map(|(name, sql)| refinery::Migration::unapplied(name, sql).map_err(migration_error))
        .collect::<Result<Vec<_>, _>>()?;
    let runner = refinery::Runner::new(&migrations)
        .set_grouped(true)
        .set_abort_divergent(true)
        .set_abort_missing(true);
    let has_history = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE])
        .await?
        .try_get::<_, bool>(0)?;
    if has_history {
        let recorded = runner
            .get_last_applied_migration_async(client)
            .await
            .map_err(migration_error)?;
        let supported = latest_version();
        if let Some(found) = recorded.map(|migration| i64::from(migration.version())) {
            if found > supported {
                return Err(StoreError::SchemaTooNew { found, supported });
            }
        }
    }
    let report = runner.run_async(client).await.map_err(migration_error)?;
    super::super::log_applied_migrations(&report);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{cluster, PostgresStore};
    use super::*;

    #[tokio::test]
    async fn a_schema_newer_than_this_binary_is_refused_naming_both_versions() {
        let Some(url) = cluster::fresh_database_url().await else {
            return;
        };
        let store = PostgresStore::connect(&url, None, None)
            .await
            .expect("connect");
        let client = store.client().await.expect("a connection");
        client
            .execute(
                "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
                 VALUES (99, 'from_the_future', '2030-01-01T00:00:00Z', '0')",
                &[],
            )
            .await
            .expect("record a future migration");
        let error = PostgresStore::connect(&url, None, None)
            .await
            .expect_err("a newer schema is refused");
        assert!(
            matches!(error, StoreError::SchemaTooNew { found: 99, supported } if supported == latest_version()),
            "{error}"
        );
    }
}
