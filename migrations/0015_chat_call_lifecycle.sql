-- The call lifecycle (DESIGN "The call lifecycle"): one user action is one call, one hold and at most
-- one charge, however it ends and however often it is retried.
--
-- chat_instances: each running chat instance renews a lease (alive_until) every few seconds. A call's
-- pending event is published as failed only once the lease of the instance running it has lapsed
-- (the instance is gone), never because the call is slow.
CREATE TABLE chat_instances (
    instance_id  uuid PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    alive_until  timestamptz NOT NULL
);

-- chat_calls: one row per (user, Idempotency-Key), written in the same statement as the call's outbox
-- row. A retry while the call runs attaches to it; a retry after it ended gets `outcome` (the answer
-- and its billing; the answer itself is dropped after 15 minutes, the billing kept). The same key with
-- another body (request_hash) is refused. Never a key: the body hash is of the feature and message.
CREATE TABLE chat_calls (
    user_id          text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 200),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    request_hash     text NOT NULL CHECK (length(request_hash) = 64),
    event_id         uuid NOT NULL UNIQUE,
    instance_id      uuid NOT NULL,
    stream           boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    ended_at         timestamptz,
    -- {"status": <HTTP status>, "body": <the JSON answer>}; set once, when the call ends.
    outcome          jsonb,
    answer_kept      boolean NOT NULL DEFAULT true,
    PRIMARY KEY (user_id, idempotency_key),
    CHECK ((ended_at IS NULL) = (outcome IS NULL))
);
CREATE INDEX chat_calls_created_at_idx ON chat_calls (created_at);
CREATE INDEX chat_calls_answers_idx ON chat_calls (ended_at) WHERE answer_kept AND ended_at IS NOT NULL;

-- The outbox row knows which instance runs its call (NULL: written before this migration; those still
-- lapse after the old fixed delay).
ALTER TABLE chat_outbox ADD COLUMN instance_id uuid;
CREATE INDEX chat_outbox_instance_idx ON chat_outbox (instance_id) WHERE NOT ready;
