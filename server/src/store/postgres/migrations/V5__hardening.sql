-- Migration 5 (hardening, issue 14):
-- * what an agent's own access boundary refused to install, per machine
--   (JSON list of {login, user, grant_id, key, reason});
-- * signed checkpoints of the audit chain: the head (`seq`, `head_hash`)
--   signed with the audit key kept in the data directory, never here, so
--   that whoever can write this database cannot forge one.
ALTER TABLE machine_access ADD COLUMN refused TEXT NOT NULL DEFAULT '[]';
CREATE TABLE audit_checkpoints (
    seq BIGINT PRIMARY KEY,
    head_hash TEXT NOT NULL,
    at BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);
