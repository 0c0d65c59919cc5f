-- Migration 4: the last image verification of each machine (issue 18).
-- `details` holds the image, the counts and the bounded list of differences
-- as JSON; the columns are what listings filter and sort on.
CREATE TABLE image_verifications (
    machine_id TEXT PRIMARY KEY,
    received_at BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    result TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    bytes_read BIGINT NOT NULL,
    details TEXT NOT NULL
);
