-- Migration 7: when a join token was revoked and when it was last used
-- (its "spent" time once every allowed use is done), for `token list`.
-- NULL for tokens revoked or used before this migration: their times were
-- never recorded.
ALTER TABLE join_tokens ADD COLUMN revoked_at BIGINT;
ALTER TABLE join_tokens ADD COLUMN last_used_at BIGINT;
