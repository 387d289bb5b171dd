-- The chat service's tables: its transactional outbox of ModelCallCompleted events and each user's
-- model settings. Neither ever holds a key: settings keep only the key's hint (a CHECK keeps it
-- hint-sized, so a bug cannot park a whole key there).

-- One row per model call. It is written *before* the provider is asked (ready = false, holding the
-- call as a failed event) and completed right after the answer (ready = true, the real event), so a
-- process that dies mid-call still leaves an event behind: the relay publishes rows that are ready,
-- and rows left in flight longer than the provider timeout (as failed calls, which are never billed).
-- The relay deletes a row once Kafka has acknowledged its event.
CREATE TABLE chat_outbox (
    id          bigserial PRIMARY KEY,
    event_id    uuid NOT NULL UNIQUE,
    user_id     text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 200),
    payload     bytea NOT NULL,
    ready       boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chat_outbox_ready_idx ON chat_outbox (id) WHERE ready;
CREATE INDEX chat_outbox_in_flight_idx ON chat_outbox (created_at) WHERE NOT ready;

CREATE TABLE chat_model_settings (
    user_id      text PRIMARY KEY CHECK (length(user_id) BETWEEN 1 AND 200),
    provider     text NOT NULL CHECK (provider IN ('openai', 'anthropic', 'groq', 'gemini')),
    model        text NOT NULL CHECK (length(model) BETWEEN 1 AND 200),
    use_own_key  boolean NOT NULL DEFAULT false,
    key_hint     text CHECK (key_hint IS NULL OR length(key_hint) <= 16),
    key_status   text,
    key_message  text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
