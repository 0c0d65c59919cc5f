-- Migration 4: the last image verification of each machine (issue 18).
-- `details` holds the image, the counts and the bounded list of differences
-- as JSON; the columns are what listings filter and sort on.
CREATE TABLE image_verifications (
    machine_id TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    result TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    bytes_read INTEGER NOT NULL,
    details TEXT NOT NULL
);
