-- BYOK tells the truth (DESIGN.md): one key per provider in a session, each revocable on the server,
-- and an explicit per-user choice to fall back to platform credits.
--
-- chat_session_keys holds what the server must know to honour or refuse a key cookie: its id, whose
-- and which session's it is, its provider, its hint and its last known status. Never the key (the
-- key lives only sealed in the browser's cookie; the hint is kept hint-sized by a CHECK). A cookie
-- whose key id is not here, or is revoked or expired here, opens nothing: a saved copy of the cookie
-- is useless after sign-out, BYOK off, removal or replacement.

ALTER TABLE chat_model_settings
    ADD COLUMN fallback_to_platform boolean NOT NULL DEFAULT false;

CREATE TABLE chat_session_keys (
    key_id          uuid PRIMARY KEY,
    user_id         text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 200),
    session_id      text NOT NULL CHECK (length(session_id) BETWEEN 1 AND 200),
    provider        text NOT NULL CHECK (provider IN ('openai', 'anthropic', 'groq', 'gemini')),
    key_hint        text NOT NULL CHECK (length(key_hint) <= 16),
    key_status      text NOT NULL CHECK (length(key_status) <= 40),
    key_message     text CHECK (length(key_message) <= 2000),
    created_at      timestamptz NOT NULL DEFAULT now(),
    checked_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    revoked_at      timestamptz,
    revoked_reason  text CHECK (revoked_reason IN ('sign_out', 'byok_off', 'removed', 'replaced')),
    CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL))
);
-- One live key per provider in a session: a new one replaces (revokes) the old in the same transaction.
CREATE UNIQUE INDEX chat_session_keys_one_live_per_provider
    ON chat_session_keys (user_id, session_id, provider) WHERE revoked_at IS NULL;
CREATE INDEX chat_session_keys_user_live_idx ON chat_session_keys (user_id) WHERE revoked_at IS NULL;
