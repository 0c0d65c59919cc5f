//! The SQLite schema as numbered migrations (`migrations/V<n>__<name>.sql`,
//! embedded in the binary), applied by `refinery` at open in one
//! transaction and recorded in its history table.
//!
//! Two cases need care. A store made before migrations existed (tables,
//! no history table) is adopted as version 1: migration 1 is the old schema
//! with its `IF NOT EXISTS`, so running it over such a store changes
//! nothing but records the version; columns that older builds never added
//! are added first. A store whose schema is newer than this binary knows is
//! refused before anything is written, naming both versions: an older
//! binary must not write into a schema it does not understand.

use rusqlite::{Connection, OptionalExtension};

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

/// A table every store made before migrations has: its presence without a
/// history table marks such a store.
const PRE_MIGRATION_MARKER_TABLE: &str = "join_tokens";

/// The schema version this binary writes.
pub(super) fn latest_version() -> i64 {
    crate::store::latest_migration_version(&MIGRATIONS)
}

fn migration_error(error: refinery::Error) -> StoreError {
    StoreError::Backend(format!("schema migration failed: {error}"))
}

fn known_migrations() -> Result<Vec<refinery::Migration>, StoreError> {
    MIGRATIONS
        .iter()
        .map(|(name, sql)| refinery::Migration::unapplied(name, sql).map_err(migration_error))
        .collect()
}

fn table_exists(connection: &Connection, table: &str) -> Result<bool, StoreError> {
    Ok(connection
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// The version recorded in the history table; `None` if there is none.
fn recorded_version(
    connection: &mut Connection,
    runner: &refinery::Runner,
) -> Result<Option<i64>, StoreError> {
    if !table_exists(connection, HISTORY_TABLE)? {
        return Ok(None);
    }
    Ok(runner
        .get_last_applied_migration(connection)
        .map_err(migration_error)?
        .map(|migration| i64::from(migration.version())))
}

/// Brings the schema to [`latest_version`], or refuses a newer one.
pub(super) fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let migrations = known_migrations()?;
    let runner = refinery::Runner::new(&migrations)
        .set_grouped(true)
        .set_abort_divergent(true)
        .set_abort_missing(true);
    let supported = latest_version();
    match recorded_version(connection, &runner)? {
        Some(found) if found > supported => {
            return Err(StoreError::SchemaTooNew { found, supported });
        }
        Some(_) => {}
        None if table_exists(connection, PRE_MIGRATION_MARKER_TABLE)? => {
            tracing::info!("store made before schema migrations: adopting it as version 1");
            add_missing_columns(connection, MIGRATIONS[0].1)?;
        }
        None => {}
    }
    let report = runner.run(connection).map_err(migration_error)?;
    super::super::log_applied_migrations(&report);
    Ok(())
}

/// One column as `PRAGMA table_info` describes it.
struct Column {
    name: String,
    declared_type: String,
    not_null: bool,
    default: Option<String>,
}

fn columns(connection: &Connection, table: &str) -> Result<Vec<Column>, StoreError> {
    let mut statement = connection
        .prepare("SELECT name, type, \"notnull\", dflt_value FROM pragma_table_info(?1)")?;
    let rows = statement
        .query_map([table], |row| {
            Ok(Column {
                name: row.get(0)?,
                declared_type: row.get(1)?,
                not_null: row.get(2)?,
                default: row.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Adds to the existing tables of a pre-migration store the columns that
/// `schema` declares and the store lacks (the build that made it predates
/// them, and `CREATE TABLE IF NOT EXISTS` never added them). Such columns
/// were always added with a default or as nullable; one without either
/// cannot be filled in, and the store is refused.
fn add_missing_columns(connection: &Connection, schema: &str) -> Result<(), StoreError> {
    let reference = Connection::open_in_memory()?;
    reference.execute_batch(schema)?;
    let tables: Vec<String> = {
        let mut statement = reference.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )?;
        let names = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<Vec<_>, _>>()?;
        names
    };
    for table in tables {
        let present = columns(connection, &table)?;
        if present.is_empty() {
            continue; // migration 1 creates the whole table
        }
        for column in columns(&reference, &table)? {
            if present.iter().any(|existing| existing.name == column.name) {
                continue;
            }
            let mut definition = format!("\"{}\" {}", column.name, column.declared_type);
            match (&column.default, column.not_null) {
                (Some(default), true) => definition.push_str(&format!(" NOT NULL DEFAULT {default}")),
                (Some(default), false) => definition.push_str(&format!(" DEFAULT {default}")),
                (None, false) => {}
                (None, true) => {
                    return Err(StoreError::Corrupt(format!(
                        "table {table} lacks column {}, which has no default: this store cannot be adopted",
                        column.name
                    )))
                }
            }
            tracing::info!(%table, column = %column.name, "adding a column missing from a pre-migration store");
            connection
                .execute_batch(&format!("ALTER TABLE \"{table}\" ADD COLUMN {definition}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use uuid::Uuid;

    use super::super::tests::TemporaryDirectory;
    use super::*;
    use crate::domain::rollout::{MachineRolloutState, Rollout, RolloutMachine, RolloutState};
    use crate::store::contract::{
        audit_event, labels, machine, operator, rollout, rollout_machine, token,
    };
    use crate::store::repair::{
        QuarantineRecord, RemediationEventRecord, RemediationState, RepairStore,
    };
    use crate::store::{
        AccessStore, DeniedEntry, DeniedKind, DesiredImageRecord, FoundKeysRecord, GrantRecord,
        ImageRecord, Inventory, JoinTokenRecord, MachineAccessRecord, MachineRecord,
        OperatorRecord, ReleaseKeyRecord, RolloutStore, SqliteStore, StateTransitionRecord, Store,
        UserKeyRecord, UserRecord,
    };
    use flotte_common::audit::{AuditEvent, AuditFilter};
    use flotte_common::roles::Role;

    /// Every record written into the pre-migration fixture, as written.
    struct FixtureRecords {
        tokens: Vec<JoinTokenRecord>,
        machines: Vec<MachineRecord>,
        inventory: Inventory,
        relabel: BTreeMap<String, String>,
        transition: StateTransitionRecord,
        desired: DesiredImageRecord,
        machine_denied: Vec<DeniedEntry>,
        image: ImageRecord,
        operators: Vec<OperatorRecord>,
        operator_denied: Vec<DeniedEntry>,
        release_key: ReleaseKeyRecord,
        audit: Vec<AuditEvent>,
        rollout: Rollout,
        rollout_machines: Vec<RolloutMachine>,
        user: UserRecord,
        user_keys: Vec<UserKeyRecord>,
        grant: GrantRecord,
        machine_access: Vec<MachineAccessRecord>,
        quarantine: QuarantineRecord,
        remediation: RemediationEventRecord,
    }

    fn fixture_uuid(text: &str) -> Uuid {
        Uuid::parse_str(text).unwrap()
    }

    fn records() -> FixtureRecords {
        let web = fixture_uuid("6f1c0a52-7d43-4b8e-9a51-1f2d3c4b5a60");
        let old = fixture_uuid("0b9e8d7c-6a5b-4c3d-8e2f-a1b2c3d4e5f6");
        let rollout_id = fixture_uuid("a7c3e9d1-2b4f-4a6c-8d0e-f1a2b3c4d5e6");
        let denied = |kind, value: &str, reason: &str, at| DeniedEntry {
            kind,
            value: value.into(),
            reason: reason.into(),
            denied_at: at,
        };
        let desired = DesiredImageRecord {
            name: "app".into(),
            version: "2.0.0".into(),
            digest: "d2".into(),
            rollback: false,
        };
        FixtureRecords {
            tokens: vec![token("tok1", "hash1", 1), token("tok2", "hash2", 5)],
            machines: vec![machine(web, "web-1"), machine(old, "old-1")],
            inventory: Inventory {
                hostname: "web-1".into(),
                os: "Debian 12".into(),
                kernel: "6.1.0".into(),
                arch: "x86_64".into(),
                agent_version: "0.1.0".into(),
                boot_time: 1_699_999_000,
            },
            relabel: [("role".to_owned(), "db".to_owned())].into(),
            transition: StateTransitionRecord {
                machine_id: web,
                at: 1_700_000_300,
                from: "unknown".into(),
                to: "operational".into(),
                reason: "first report".into(),
            },
            desired: desired.clone(),
            machine_denied: vec![denied(
                DeniedKind::Serial,
                "0a01",
                "machine old-1 was decommissioned",
                1_700_000_500,
            )],
            image: ImageRecord {
                name: "app".into(),
                version: "2.0.0".into(),
                digest: "d2".into(),
                size: 4096,
                manifest_json: b"{\"name\":\"app\"}".to_vec(),
                signature: vec![1, 2, 3, 4],
                signing_key: "ci".into(),
                pushed_at: 1_700_000_400,
                pushed_by: "alice".into(),
            },
            operators: vec![
                operator("alice", Role::Admin),
                operator("bob", Role::Operator),
                operator("carol", Role::Viewer),
            ],
            operator_denied: vec![denied(
                DeniedKind::Identity,
                "spiffe://fixture/operator/bob",
                "operator bob was revoked by alice",
                1_700_000_600,
            )],
            release_key: ReleaseKeyRecord {
                id: "k1".into(),
                name: "ci".into(),
                public_key_base64: "AAAA".into(),
                added_at: 1_700_000_050,
                added_by: "alice".into(),
            },
            audit: vec![
                audit_event(1_700_000_010, "alice", "operator.create"),
                audit_event(1_700_000_020, "alice", "token.create"),
                audit_event(1_700_000_600, "alice", "operator.revoke"),
            ],
            rollout: rollout(rollout_id, RolloutState::Running),
            rollout_machines: vec![RolloutMachine {
                state: MachineRolloutState::Sent,
                previous_image: Some(DesiredImageRecord {
                    name: "app".into(),
                    version: "1.0.0".into(),
                    digest: "d1".into(),
                    rollback: false,
                }),
                turn_at: Some(1_700_000_710),
                sent_at: Some(1_700_000_711),
                ..rollout_machine(rollout_id, web, "web-1")
            }],
            user: UserRecord {
                name: "dave".into(),
                created_at: 1_700_000_800,
                created_by: "alice".into(),
                revoked_at: None,
            },
            user_keys: vec![UserKeyRecord {
                user: "dave".into(),
                fingerprint: "SHA256:fixture".into(),
                key_type: "ssh-ed25519".into(),
                public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFixture".into(),
                comment: "dave@laptop".into(),
                added_at: 1_700_000_800,
            }],
            grant: GrantRecord {
                id: "g1".into(),
                user: "dave".into(),
                selector: "role=web".into(),
                login: "dave".into(),
                expires_at: Some(1_900_000_000),
                created_at: 1_700_000_810,
                created_by: "alice".into(),
            },
            machine_access: vec![MachineAccessRecord {
                machine_id: web,
                applied_version: 2,
                applied_at: 1_700_000_820,
                missing_logins: vec!["dave".into()],
                found: vec![FoundKeysRecord {
                    login: "dave".into(),
                    source: "/home/dave/.ssh/authorized_keys".into(),
                    public_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFixture".into()],
                    not_read_reason: None,
                }],
                refused: Vec::new(),
            }],
            quarantine: QuarantineRecord {
                machine_id: web,
                id: "q1".into(),
                reason: "disk errors".into(),
                since: 1_700_000_900,
                by: "alice".into(),
            },
            remediation: RemediationEventRecord {
                id: "e1".into(),
                machine_id: old,
                hostname: "old-1".into(),
                zone: "dc1".into(),
                labels: labels(),
                provider: "local".into(),
                state: RemediationState::Closed,
                reason: "unreachable".into(),
                opened_at: 1_700_000_450,
                updated_at: 1_700_000_480,
                token_id: "tok2".into(),
                replacement_machine_id: Some(web),
                detail: "replaced".into(),
            },
        }
    }

    /// A private copy of the committed fixture (opening migrates it in place).
    fn copy_of_fixture() -> (TemporaryDirectory, PathBuf) {
        let directory = TemporaryDirectory::new();
        let path = directory.0.join("flotte.db");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-before-migrations.db"),
            &path,
        )
        .unwrap();
        (directory, path)
    }

    #[tokio::test]
    async fn a_store_made_before_migrations_is_adopted_with_nothing_lost() {
        let (_directory, path) = copy_of_fixture();
        let store = SqliteStore::open(&path).unwrap();
        let written = records();
        let [web, old] = [written.machines[0].id, written.machines[1].id];

        let tokens = store.list_tokens().await.unwrap();
        let mut redeemed = written.tokens[0].clone();
        redeemed.uses_done = 1;
        assert_eq!(tokens, vec![redeemed, written.tokens[1].clone()]);

        let expected_web = MachineRecord {
            labels: written.relabel.clone(),
            certificate_serial: "0a02".into(),
            previous_certificate_serial: "0a01".into(),
            certificate_not_after: 1_800_000_000,
            inventory: written.inventory.clone(),
            last_seen: 1_700_000_200,
            // relabel, desired image, quarantine: one bump each
            desired_version: 4,
            state: written.transition.to.clone(),
            state_reason: written.transition.reason.clone(),
            state_since: written.transition.at,
            desired_image: Some(written.desired.clone()),
            ..written.machines[0].clone()
        };
        let expected_old = MachineRecord {
            retired_at: Some(1_700_000_500),
            ..written.machines[1].clone()
        };
        assert_eq!(store.machine(web).await.unwrap(), Some(expected_web));
        assert_eq!(store.machine(old).await.unwrap(), Some(expected_old));
        assert_eq!(store.machines().await.unwrap().len(), 2);
        assert_eq!(
            store.transitions(web, 10).await.unwrap(),
            vec![written.transition.clone()]
        );
        assert_eq!(
            store.images(None).await.unwrap(),
            vec![written.image.clone()]
        );

        let mut operators = written.operators.clone();
        operators[1].revoked_at = Some(1_700_000_600);
        assert_eq!(store.operators().await.unwrap(), operators);
        let denied: Vec<DeniedEntry> = written
            .machine_denied
            .iter()
            .chain(&written.operator_denied)
            .cloned()
            .collect();
        assert_eq!(store.denied_entries().await.unwrap(), denied);
        assert_eq!(
            store.release_keys().await.unwrap(),
            vec![written.release_key.clone()]
        );

        let audit = store.audit_entries(&AuditFilter::default()).await.unwrap();
        assert_eq!(
            flotte_common::audit::verify_chain(&audit).unwrap().entries,
            3
        );
        assert_eq!(
            audit
                .into_iter()
                .map(|entry| entry.event)
                .collect::<Vec<_>>(),
            written.audit
        );

        assert_eq!(
            store.rollouts().await.unwrap(),
            vec![written.rollout.clone()]
        );
        assert_eq!(
            store.rollout_machines(written.rollout.id).await.unwrap(),
            written.rollout_machines
        );

        let snapshot = store.access_snapshot().await.unwrap();
        assert_eq!(
            snapshot.version, 2,
            "one bump for the user, one for the grant"
        );
        assert_eq!(snapshot.users, vec![written.user.clone()]);
        assert_eq!(snapshot.keys, written.user_keys);
        assert_eq!(snapshot.grants, vec![written.grant.clone()]);
        assert_eq!(
            store.machine_access().await.unwrap(),
            written.machine_access
        );

        assert_eq!(
            store.quarantines().await.unwrap(),
            vec![written.quarantine.clone()]
        );
        assert_eq!(
            store.remediations().await.unwrap(),
            vec![written.remediation.clone()]
        );

        // Adopted as version 1, and still writable.
        let recorded: i64 = {
            let connection = Connection::open(&path).unwrap();
            connection
                .query_row(
                    &format!("SELECT MAX(version) FROM {HISTORY_TABLE}"),
                    [],
                    |row| row.get(0),
                )
                .unwrap()
        };
        assert_eq!(recorded, latest_version());
        store
            .insert_token(&JoinTokenRecord {
                id: "tok3".into(),
                secret_hash: "hash3".into(),
                ..written.tokens[1].clone()
            })
            .await
            .unwrap();
        drop(store);
        // A second open finds nothing to do.
        assert_eq!(
            SqliteStore::open(&path)
                .unwrap()
                .list_tokens()
                .await
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn a_store_migrated_by_a_newer_release_is_refused_naming_both_versions() {
        let directory = TemporaryDirectory::new();
        let path = directory.0.join("flotte.db");
        {
            let mut connection = Connection::open(&path).unwrap();
            let mut newer = known_migrations().unwrap();
            newer.push(
                refinery::Migration::unapplied(
                    &format!("V{}__future", latest_version() + 1),
                    "CREATE TABLE future (id TEXT);",
                )
                .unwrap(),
            );
            refinery::Runner::new(&newer)
                .set_grouped(true)
                .run(&mut connection)
                .unwrap();
        }
        let error = SqliteStore::open(&path).unwrap_err();
        let (newer_version, known_version) = (latest_version() + 1, latest_version());
        assert!(
            matches!(error, StoreError::SchemaTooNew { found, supported }
                if found == newer_version && supported == known_version),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&format!("version {newer_version}"))
                && message.contains(&format!("version {known_version}")),
            "{message}"
        );
    }

    #[tokio::test]
    async fn columns_that_older_builds_never_added_are_added_on_adoption() {
        let directory = TemporaryDirectory::new();
        let path = directory.0.join("flotte.db");
        let id = Uuid::new_v4();
        {
            // The machines table as an early build made it.
            let connection = Connection::open(&path).unwrap();
            connection
                .execute_batch(
                    "CREATE TABLE join_tokens (id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL UNIQUE,
                        labels TEXT NOT NULL, zone TEXT NOT NULL, created_at INTEGER NOT NULL,
                        expires_at INTEGER NOT NULL, uses_allowed INTEGER NOT NULL,
                        uses_done INTEGER NOT NULL, revoked INTEGER NOT NULL);
                     CREATE TABLE machines (id TEXT PRIMARY KEY, labels TEXT NOT NULL,
                        zone TEXT NOT NULL, enrolled_at INTEGER NOT NULL,
                        enrolled_with_token TEXT NOT NULL, certificate_serial TEXT NOT NULL,
                        certificate_not_after INTEGER NOT NULL, hostname TEXT NOT NULL,
                        os TEXT NOT NULL, kernel TEXT NOT NULL, arch TEXT NOT NULL,
                        agent_version TEXT NOT NULL, boot_time INTEGER NOT NULL,
                        last_seen INTEGER NOT NULL, desired_version INTEGER NOT NULL);",
                )
                .unwrap();
            connection
                .execute(
                    "INSERT INTO machines VALUES (?1, '{}', 'dc1', 1, 't', '0a', 9, 'web-1', 'linux',
                        '6.1', 'x86_64', '0.1', 1, 5, 3)",
                    [id.to_string()],
                )
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let machine = store.machine(id).await.unwrap().unwrap();
        assert_eq!(
            (
                machine.inventory.hostname.as_str(),
                machine.desired_version,
                machine.previous_certificate_serial.as_str(),
                machine.state.as_str(),
                machine.retired_at,
                machine.desired_image,
            ),
            ("web-1", 3, "", "unknown", None, None)
        );
        store
            .update_labels(id, &BTreeMap::new())
            .await
            .unwrap()
            .unwrap();
    }
}
