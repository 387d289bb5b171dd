-- The credit ledger: accounts, grants and one ledger entry per decided event.
--
-- Invariants held by the database itself, whatever the client does:
--   * balance = granted - debited, where granted = sum(grants) and debited = sum(ledger entries);
--     the two sums are maintained only by the statement triggers below (a direct UPDATE of them is
--     refused) and balance is a generated column.
--   * an event is decided once: ledger_entries.event_id is unique for decisions.
--   * history is append-only: ledger entries and grants cannot be updated or deleted; a mistake is
--     fixed by a correction entry.

CREATE TABLE accounts (
    user_id     text PRIMARY KEY CHECK (length(user_id) BETWEEN 1 AND 200),
    granted     bigint NOT NULL DEFAULT 0,
    debited     bigint NOT NULL DEFAULT 0,
    balance     bigint GENERATED ALWAYS AS (granted - debited) STORED,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE grants (
    grant_key   text PRIMARY KEY CHECK (length(grant_key) BETWEEN 1 AND 200),
    user_id     text NOT NULL REFERENCES accounts (user_id),
    plan        text NOT NULL,
    credits     bigint NOT NULL CHECK (credits > 0),
    granted_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX grants_user_idx ON grants (user_id);

-- kind 'decision': what the credit policy decided for one event (credits > 0 only when debited).
-- kind 'correction': a compensating entry written by finance; credits may be negative (a refund).
CREATE TABLE ledger_entries (
    entry_id            uuid PRIMARY KEY,
    event_id            uuid,
    kind                text NOT NULL CHECK (kind IN ('decision', 'correction')),
    user_id             text NOT NULL REFERENCES accounts (user_id),
    decision            text NOT NULL CHECK (decision IN
                            ('debited', 'not_billed_byok', 'not_billed_failed', 'rejected', 'correction')),
    credits             bigint NOT NULL,
    price_list_version  text,
    reason              text,
    provider            text,
    model               text,
    feature             text,
    key_source          text,
    status              text,
    occurred_at         timestamptz,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (kind = 'correction' OR credits >= 0),
    CHECK (kind = 'correction' OR entry_id = event_id),
    CHECK ((decision = 'debited') = (kind = 'decision' AND credits > 0) OR kind = 'correction'),
    CHECK ((kind = 'correction') = (decision = 'correction')),
    CHECK (decision <> 'debited' OR price_list_version IS NOT NULL)
);
CREATE UNIQUE INDEX ledger_entries_one_decision_per_event
    ON ledger_entries (event_id) WHERE kind = 'decision';
CREATE INDEX ledger_entries_user_idx ON ledger_entries (user_id);
CREATE INDEX ledger_entries_event_idx ON ledger_entries (event_id);

-- Outcomes waiting to be published to Kafka; written in the same transaction as the ledger entries
-- they describe, deleted by the relay once Kafka has acknowledged them.
CREATE TABLE credit_outbox (
    id          bigserial PRIMARY KEY,
    topic       text NOT NULL,
    key         bytea,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Sums are maintained set-wise, once per statement, so a batch insert costs one UPDATE per user.
CREATE FUNCTION ledger_apply_entries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts a
       SET debited = a.debited + s.total, updated_at = now()
      FROM (SELECT user_id, sum(credits) AS total FROM new_rows GROUP BY user_id) s
     WHERE a.user_id = s.user_id AND s.total <> 0;
    RETURN NULL;
END $$;

CREATE TRIGGER ledger_entries_apply AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_apply_entries();

CREATE FUNCTION grants_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts a
       SET granted = a.granted + s.total, updated_at = now()
      FROM (SELECT user_id, sum(credits) AS total FROM new_rows GROUP BY user_id) s
     WHERE a.user_id = s.user_id;
    RETURN NULL;
END $$;

CREATE TRIGGER grants_apply AFTER INSERT ON grants
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION grants_apply();

CREATE FUNCTION refuse_history_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: write a correction entry instead of %', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION refuse_history_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_history_change();
CREATE TRIGGER grants_append_only BEFORE UPDATE OR DELETE ON grants
    FOR EACH ROW EXECUTE FUNCTION refuse_history_change();

-- The sums may change only from inside the triggers above (trigger depth 2), never directly.
CREATE FUNCTION accounts_guard_sums() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND (NEW.granted <> 0 OR NEW.debited <> 0) THEN
        RAISE EXCEPTION 'a new account starts at zero; credits arrive only as grants'
            USING ERRCODE = 'check_violation';
    END IF;
    IF TG_OP = 'UPDATE' AND pg_trigger_depth() < 2
       AND (NEW.granted <> OLD.granted OR NEW.debited <> OLD.debited) THEN
        RAISE EXCEPTION 'account sums follow grants and ledger entries; they cannot be set directly'
            USING ERRCODE = 'check_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'accounts cannot be deleted' USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;

CREATE TRIGGER accounts_guard BEFORE INSERT OR UPDATE OR DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_guard_sums();
