-- Migration 6: forensic bundles in the database, so that a bundle uploaded
-- through one replica is served by every other (SQLite's single server
-- keeps them as files instead). An upload claims its quarantine with a
-- `forensic_uploads` row (one at a time; a claim untouched for long is
-- taken over, so a replica killed mid-upload blocks nothing for good),
-- writes chunks under its upload id, and becomes visible, whole and
-- proved, when its `forensic_bundles` row is inserted — at most one per
-- quarantine, never replaced.
CREATE TABLE forensic_uploads (
    machine_id TEXT NOT NULL,
    quarantine_id TEXT NOT NULL,
    upload_id TEXT NOT NULL UNIQUE,
    touched_at_ms BIGINT NOT NULL,
    PRIMARY KEY (machine_id, quarantine_id)
);
CREATE TABLE forensic_chunks (
    upload_id TEXT NOT NULL,
    chunk BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (upload_id, chunk)
);
CREATE TABLE forensic_bundles (
    machine_id TEXT NOT NULL,
    quarantine_id TEXT NOT NULL,
    upload_id TEXT NOT NULL UNIQUE,
    received_at BIGINT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (machine_id, quarantine_id)
);
