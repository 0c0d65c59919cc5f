-- Migration 1: the schema as the store created it before numbered
-- migrations existed (CREATE TABLE IF NOT EXISTS at every open, columns
-- added inside those statements over time). `IF NOT EXISTS` stays so that a
-- store made before migrations is adopted as version 1 by running this file
-- over it. Never edit an applied migration: add the next one.
CREATE TABLE IF NOT EXISTS join_tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL,
    zone TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    uses_allowed INTEGER NOT NULL,
    uses_done INTEGER NOT NULL,
    revoked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    zone TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    enrolled_with_token TEXT NOT NULL,
    certificate_serial TEXT NOT NULL,
    previous_certificate_serial TEXT NOT NULL DEFAULT '',
    certificate_not_after INTEGER NOT NULL,
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    kernel TEXT NOT NULL,
    arch TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    boot_time INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    desired_version INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'unknown',
    state_reason TEXT NOT NULL DEFAULT '',
    state_since INTEGER NOT NULL DEFAULT 0,
    retired_at INTEGER,
    desired_image TEXT
);
CREATE TABLE IF NOT EXISTS images (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    manifest_json BLOB NOT NULL,
    signature BLOB NOT NULL,
    signing_key TEXT NOT NULL,
    pushed_at INTEGER NOT NULL,
    pushed_by TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS machine_transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS machine_transitions_by_machine ON machine_transitions (machine_id, seq);
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    certificate_serial TEXT NOT NULL,
    certificate_not_after INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS deny_list (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT NOT NULL,
    denied_at INTEGER NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE TABLE IF NOT EXISTS release_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    public_key_base64 TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    added_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    arguments_json TEXT NOT NULL,
    result TEXT NOT NULL,
    previous_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);
CREATE TABLE IF NOT EXISTS quarantines (
    machine_id TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    reason TEXT NOT NULL,
    since INTEGER NOT NULL,
    quarantined_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS remediation_events (
    id TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL,
    hostname TEXT NOT NULL,
    zone TEXT NOT NULL,
    labels TEXT NOT NULL,
    provider TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    opened_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    token_id TEXT NOT NULL,
    replacement_machine_id TEXT,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    image_name TEXT NOT NULL,
    image_version TEXT NOT NULL,
    image_digest TEXT NOT NULL,
    plan_json TEXT NOT NULL,
    plan_toml TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    wave_stages TEXT NOT NULL,
    current_wave INTEGER NOT NULL,
    wave_started_at INTEGER,
    approved_stages TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_machines (
    rollout_id TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    hostname TEXT NOT NULL,
    zone TEXT NOT NULL,
    stage INTEGER NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL,
    previous_image TEXT,
    turn_at INTEGER,
    sent_at INTEGER,
    committed_at INTEGER,
    finished_at INTEGER,
    failure_reason TEXT NOT NULL,
    PRIMARY KEY (rollout_id, machine_id)
);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS user_keys (
    user TEXT NOT NULL REFERENCES users (name),
    fingerprint TEXT NOT NULL,
    key_type TEXT NOT NULL,
    public_key TEXT NOT NULL,
    comment TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    PRIMARY KEY (user, fingerprint)
);
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users (name),
    selector TEXT NOT NULL,
    login TEXT NOT NULL,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS access_policy_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO access_policy_version (id, version) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS machine_access (
    machine_id TEXT PRIMARY KEY,
    applied_version INTEGER NOT NULL,
    applied_at INTEGER NOT NULL,
    missing_logins TEXT NOT NULL,
    found TEXT NOT NULL
);
