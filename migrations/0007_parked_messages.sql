-- Messages a relay could not publish because of what they are (larger than the broker takes, refused
-- as invalid), not because Kafka was away. Retrying such a message would block every message behind
-- it forever; dropping it would lose it. It is parked here instead, with Kafka's error, counted on
-- /metrics (`relay_parked_total`), for an operator to fix and re-queue.
CREATE TABLE parked_messages (
    id          bigserial PRIMARY KEY,
    source      text NOT NULL,   -- the relay: 'credit_outbox' | 'credit_outcomes' | 'chat_outbox'
    topic       text NOT NULL,
    key         bytea,
    payload     bytea NOT NULL,
    headers     jsonb NOT NULL DEFAULT '{}',
    error       text NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now()
);
