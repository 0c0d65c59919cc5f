-- Migration 1 (PostgreSQL): the same schema as SQLite's migration 1, in
-- PostgreSQL's dialect: BIGINT for SQLite's INTEGER, BYTEA for BLOB,
-- BOOLEAN for the revoked flag, an identity column for the transitions'
-- sequence, and "user" quoted (a reserved word here). Never edit an applied
-- migration: add the next one, with the same number as SQLite's.
CREATE TABLE join_tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL,
    zone TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    uses_allowed BIGINT NOT NULL,
    uses_done BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL
);
CREATE TABLE machines (
    id TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    zone TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL,
    enrolled_with_token TEXT NOT NULL,
    certificate_serial TEXT NOT NULL,
    previous_certificate_serial TEXT NOT NULL DEFAULT '',
    certificate_not_after BIGINT NOT NULL,
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    kernel TEXT NOT NULL,
    arch TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    boot_time BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    desired_version BIGINT NOT NULL,
    state TEXT NOT NULL DEFAULT 'unknown',
    state_reason TEXT NOT NULL DEFAULT '',
    state_since BIGINT NOT NULL DEFAULT 0,
    retired_at BIGINT,
    desired_image TEXT
);
CREATE TABLE images (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    size BIGINT NOT NULL,
    manifest_json BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    signing_key TEXT NOT NULL,
    pushed_at BIGINT NOT NULL,
    pushed_by TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE machine_transitions (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    machine_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX machine_transitions_by_machine ON machine_transitions (machine_id, seq);
CREATE TABLE operators (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    certificate_serial TEXT NOT NULL,
    certificate_not_after BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE deny_list (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT NOT NULL,
    denied_at BIGINT NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE TABLE release_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    public_key_base64 TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    added_by TEXT NOT NULL
);
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    arguments_json TEXT NOT NULL,
    result TEXT NOT NULL,
    previous_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE TABLE quarantines (
    machine_id TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    reason TEXT NOT NULL,
    since BIGINT NOT NULL,
    quarantined_by TEXT NOT NULL
);
CREATE TABLE remediation_events (
    id TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL,
    hostname TEXT NOT NULL,
    zone TEXT NOT NULL,
    labels TEXT NOT NULL,
    provider TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    opened_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    token_id TEXT NOT NULL,
    replacement_machine_id TEXT,
    detail TEXT NOT NULL
);
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    image_name TEXT NOT NULL,
    image_version TEXT NOT NULL,
    image_digest TEXT NOT NULL,
    plan_json TEXT NOT NULL,
    plan_toml TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    wave_stages TEXT NOT NULL,
    current_wave BIGINT NOT NULL,
    wave_started_at BIGINT,
    approved_stages TEXT NOT NULL
);
CREATE TABLE rollout_machines (
    rollout_id TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    hostname TEXT NOT NULL,
    zone TEXT NOT NULL,
    stage BIGINT NOT NULL,
    wave BIGINT NOT NULL,
    state TEXT NOT NULL,
    previous_image TEXT,
    turn_at BIGINT,
    sent_at BIGINT,
    committed_at BIGINT,
    finished_at BIGINT,
    failure_reason TEXT NOT NULL,
    PRIMARY KEY (rollout_id, machine_id)
);
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE user_keys (
    "user" TEXT NOT NULL REFERENCES users (name),
    fingerprint TEXT NOT NULL,
    key_type TEXT NOT NULL,
    public_key TEXT NOT NULL,
    comment TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    PRIMARY KEY ("user", fingerprint)
);
CREATE TABLE grants (
    id TEXT PRIMARY KEY,
    "user" TEXT NOT NULL REFERENCES users (name),
    selector TEXT NOT NULL,
    login TEXT NOT NULL,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE access_policy_version (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO access_policy_version (id, version) VALUES (1, 0);
CREATE TABLE machine_access (
    machine_id TEXT PRIMARY KEY,
    applied_version BIGINT NOT NULL,
    applied_at BIGINT NOT NULL,
    missing_logins TEXT NOT NULL,
    found TEXT NOT NULL
);
