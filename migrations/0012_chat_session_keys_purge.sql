-- Key records (hints and last status, never keys: 0008) are of no use once their key has expired: a
-- cookie older than its expiry opens nothing. The chat service deletes them a retention period after
-- expiry (KEY_RECORD_RETENTION_S, default one day); this index keeps that periodic delete from reading
-- the whole table.
CREATE INDEX chat_session_keys_expires_at_idx ON chat_session_keys (expires_at);
