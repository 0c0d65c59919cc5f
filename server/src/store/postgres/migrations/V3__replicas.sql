-- Migration 3: several server replicas share one store.
-- A rollout row carries a revision: every write names the revision it read,
-- so a replica holding a stale copy never overwrites a newer change.
ALTER TABLE rollouts ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
-- One row per replica, renewed every few seconds (times in milliseconds of
-- the database's clock on PostgreSQL, so replicas' clocks never compare).
CREATE TABLE replicas (
    name TEXT PRIMARY KEY,
    zone TEXT NOT NULL,
    address TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    renewed_at_ms BIGINT NOT NULL,
    lease_expires_at_ms BIGINT NOT NULL
);
-- The replica holding each live agent session.
CREATE TABLE sessions (
    machine_id TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    since BIGINT NOT NULL
);
-- The leader-only loops' lease; its term is the fencing token every write
-- of those loops carries.
CREATE TABLE leadership (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    lease_expires_at_ms BIGINT NOT NULL
);
INSERT INTO leadership (singleton, holder, term, lease_expires_at_ms) VALUES (1, '', 0, 0);
-- Image payloads in the database, so that every replica serves every
-- download (SQLite's single server keeps them as files instead): a blob is
-- written as chunks under an upload id and becomes visible, whole and
-- verified, when a `blobs` row names that upload.
CREATE TABLE blob_chunks (
    upload_id TEXT NOT NULL,
    chunk BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (upload_id, chunk)
);
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    upload_id TEXT NOT NULL,
    size BIGINT NOT NULL
);
