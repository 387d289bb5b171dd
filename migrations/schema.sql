-- The current schema, as the migrations in this folder build it (generated: `make schema`).
-- Do not edit: add a migration, then regenerate. A test fails when this file drifts.

CREATE FUNCTION accounts_guard_sums() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF TG_OP = 'INSERT' AND (NEW.granted <> 0 OR NEW.debited <> 0 OR NEW.held <> 0) THEN
        RAISE EXCEPTION 'a new account starts at zero; credits arrive only as grants'
            USING ERRCODE = 'check_violation';
    END IF;
    IF TG_OP = 'UPDATE' AND pg_trigger_depth() < 2
       AND (NEW.granted <> OLD.granted OR NEW.debited <> OLD.debited OR NEW.held <> OLD.held) THEN
        RAISE EXCEPTION 'account sums follow grants, ledger entries and holds; they cannot be set directly'
            USING ERRCODE = 'check_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'accounts cannot be deleted' USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;

CREATE FUNCTION grants_apply() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    UPDATE accounts a
       SET granted = a.granted + s.total, updated_at = now()
      FROM (SELECT user_id, sum(credits) AS total FROM new_rows GROUP BY user_id) s
     WHERE a.user_id = s.user_id;
    RETURN NULL;
END $$;

CREATE FUNCTION holds_admit() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    acct record;
BEGIN
    -- The account's row lock serialises this user's placements with each other and with the ledger
    -- writer (which locks accounts before it decides events and releases their holds).
    SELECT balance, held INTO acct FROM accounts WHERE user_id = NEW.user_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no credits: user % has no account', NEW.user_id
            USING ERRCODE = 'check_violation', HINT = 'insufficient_credits', DETAIL = 'available=0';
    END IF;
    -- A concurrent placement of the same hold committed while we waited for the lock: it stands.
    IF EXISTS (SELECT 1 FROM holds WHERE event_id = NEW.event_id) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM ledger_entries WHERE entry_id = NEW.event_id) THEN
        RAISE EXCEPTION 'event % is already decided; it cannot be held', NEW.event_id
            USING ERRCODE = 'check_violation', HINT = 'already_decided';
    END IF;
    IF acct.balance - acct.held < NEW.credits THEN
        RAISE EXCEPTION 'a hold of % credits exceeds the % available', NEW.credits, acct.balance - acct.held
            USING ERRCODE = 'check_violation', HINT = 'insufficient_credits',
                  DETAIL = 'available=' || (acct.balance - acct.held);
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION holds_apply_delete() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    UPDATE accounts a SET held = a.held - s.total, updated_at = now()
      FROM (SELECT user_id, sum(credits) AS total FROM old_rows GROUP BY user_id) s
     WHERE a.user_id = s.user_id;
    RETURN NULL;
END $$;

CREATE FUNCTION holds_apply_insert() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    UPDATE accounts a SET held = a.held + s.total, updated_at = now()
      FROM (SELECT user_id, sum(credits) AS total FROM new_rows GROUP BY user_id) s
     WHERE a.user_id = s.user_id;
    RETURN NULL;
END $$;

CREATE FUNCTION holds_refuse_update() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'a hold is placed or released, never changed' USING ERRCODE = 'restrict_violation';
END $$;

CREATE FUNCTION ledger_apply_entries() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    orphan text;
BEGIN
    SELECT n.user_id INTO orphan
      FROM (SELECT DISTINCT user_id FROM new_rows) n
     WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = n.user_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger entry for user % who has no account', orphan
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    UPDATE accounts a
       SET debited = a.debited + s.total, updated_at = now()
      FROM (SELECT user_id, sum(credits) AS total FROM new_rows GROUP BY user_id) s
     WHERE a.user_id = s.user_id AND s.total <> 0;
    PERFORM pg_notify('credit_outcomes', '');
    RETURN NULL;
END $$;

CREATE FUNCTION ledger_settle_holds() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    DELETE FROM holds h USING new_rows n WHERE h.event_id = n.entry_id AND n.kind = 'decision';
    RETURN NULL;
END $$;

CREATE FUNCTION place_hold(p_event uuid, p_user text, p_credits bigint, p_feature text, p_provider text, p_model text, p_version text) RETURNS TABLE(created boolean, holder text, held_credits bigint, available bigint)
    LANGUAGE plpgsql
    SET lock_timeout TO '3s'
    AS $$
BEGIN
    created := false;
    IF NOT EXISTS (SELECT 1 FROM holds WHERE event_id = p_event) THEN
        -- No row back: the trigger found the same hold placed meanwhile.
        INSERT INTO holds (event_id, user_id, credits, feature, provider, model, price_list_version)
        VALUES (p_event, p_user, p_credits, p_feature, p_provider, p_model, p_version)
        RETURNING true INTO created;
        created := coalesce(created, false);
    END IF;
    SELECT h.user_id, h.credits INTO holder, held_credits FROM holds h WHERE h.event_id = p_event;
    SELECT a.balance - a.held INTO available FROM accounts a WHERE a.user_id = p_user;
    RETURN NEXT;
END $$;

CREATE FUNCTION refuse_history_change() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: write a correction entry instead of %', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE TABLE accounts (
    user_id text NOT NULL,
    granted bigint DEFAULT 0 NOT NULL,
    debited bigint DEFAULT 0 NOT NULL,
    balance bigint GENERATED ALWAYS AS ((granted - debited)) STORED,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    held bigint DEFAULT 0 NOT NULL,
    CONSTRAINT accounts_held_check CHECK ((held >= 0)),
    CONSTRAINT accounts_user_id_check CHECK (((length(user_id) >= 1) AND (length(user_id) <= 200)))
);

CREATE TABLE auth_revoked_sessions (
    session_id text NOT NULL,
    user_id text NOT NULL,
    revoked_at timestamp with time zone DEFAULT now() NOT NULL,
    forget_after timestamp with time zone NOT NULL,
    CONSTRAINT auth_revoked_sessions_session_id_check CHECK (((length(session_id) >= 1) AND (length(session_id) <= 200))),
    CONSTRAINT auth_revoked_sessions_user_id_check CHECK (((length(user_id) >= 1) AND (length(user_id) <= 200)))
);

CREATE TABLE auth_signed_out_everywhere (
    user_id text NOT NULL,
    not_before timestamp with time zone NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT auth_signed_out_everywhere_user_id_check CHECK (((length(user_id) >= 1) AND (length(user_id) <= 200)))
);

CREATE TABLE chat_calls (
    user_id text NOT NULL,
    idempotency_key text NOT NULL,
    request_hash text NOT NULL,
    event_id uuid NOT NULL,
    instance_id uuid NOT NULL,
    stream boolean DEFAULT false NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    ended_at timestamp with time zone,
    outcome jsonb,
    answer_kept boolean DEFAULT true NOT NULL,
    CONSTRAINT chat_calls_check CHECK (((ended_at IS NULL) = (outcome IS NULL))),
    CONSTRAINT chat_calls_idempotency_key_check CHECK (((length(idempotency_key) >= 1) AND (length(idempotency_key) <= 200))),
    CONSTRAINT chat_calls_request_hash_check CHECK ((length(request_hash) = 64)),
    CONSTRAINT chat_calls_user_id_check CHECK (((length(user_id) >= 1) AND (length(user_id) <= 200)))
);

CREATE TABLE chat_instances (
    instance_id uuid NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    alive_until timestamp with time zone NOT NULL
);

CREATE TABLE chat_model_settings (
    user_id text NOT NULL,
    provider text NOT NULL,
    model text NOT NULL,
    use_own_key boolean DEFAULT false NOT NULL,
    key_hint text,
    key_status text,
    key_message text,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    fallback_to_platform boolean DEFAULT false NOT NULL,
    CONSTRAINT chat_model_settings_key_hint_check CHECK (((key_hint IS NULL) OR (length(key_hint) <= 16))),
    CONSTRAINT chat_model_settings_model_check CHECK (((length(model) >= 1) AND (length(model) <= 200))),
    CONSTRAINT chat_model_settings_provider_shape CHECK ((provider ~ '^[a-z][a-z0-9_]{0,39}$'::text)),
    CONSTRAINT chat_model_settings_user_id_check CHECK (((length(user_id) >= 1) AND (length(user_id) <= 200)))
);

CREATE TABLE chat_outbox (
    id bigint NOT NULL,
    event_id uuid NOT NULL,
    user_id text NOT NULL,
    payload bytea NOT NULL,
    ready boolean DEFAULT false NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    instance_id uuid,
    CONSTRAINT chat_outbox_user_id_check CHECK (((length(user_id) >= 1) AND (length(user_id) <= 200)))
);

CREATE SEQUENCE chat_outbox_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE chat_outbox_id_seq OWNED BY chat_outbox.id;

CREATE TABLE chat_session_keys (
    key_id uuid NOT NULL,
    user_id text NOT NULL,
    session_id text NOT NULL,
    provider text NOT NULL,
    key_hint text NOT NULL,
    key_status text NOT NULL,
    key_message text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    checked_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    revoked_at timestamp with time zone,
    revoked_reason text,
    CONSTRAINT chat_session_keys_check CHECK (((revoked_at IS NULL) = (revoked_reason IS NULL))),
    CONSTRAINT chat_session_keys_key_hint_check CHECK ((length(key_hint) <= 16)),
    CONSTRAINT chat_session_keys_key_message_check CHECK ((length(key_message) <= 2000)),
    CONSTRAINT chat_session_keys_key_status_check CHECK ((length(key_status) <= 40)),
    CONSTRAINT chat_session_keys_provider_shape CHECK ((provider ~ '^[a-z][a-z0-9_]{0,39}$'::text)),
    CONSTRAINT chat_session_keys_revoked_reason_check CHECK ((revoked_reason = ANY (ARRAY['sign_out'::text, 'byok_off'::text, 'removed'::text, 'replaced'::text]))),
    CONSTRAINT chat_session_keys_session_id_check CHECK (((length(session_id) >= 1) AND (length(session_id) <= 200))),
    CONSTRAINT chat_session_keys_user_id_check CHECK (((length(user_id) >= 1) AND (length(user_id) <= 200)))
);

CREATE TABLE credit_outbox (
    id bigint NOT NULL,
    topic text NOT NULL,
    key bytea,
    payload bytea NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    headers jsonb DEFAULT '{}'::jsonb NOT NULL
);

CREATE SEQUENCE credit_outbox_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE credit_outbox_id_seq OWNED BY credit_outbox.id;

CREATE TABLE grants (
    grant_key text NOT NULL,
    user_id text NOT NULL,
    plan text NOT NULL,
    credits bigint NOT NULL,
    granted_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT grants_credits_check CHECK ((credits > 0)),
    CONSTRAINT grants_grant_key_check CHECK (((length(grant_key) >= 1) AND (length(grant_key) <= 200)))
);

CREATE TABLE holds (
    event_id uuid NOT NULL,
    user_id text NOT NULL,
    credits bigint NOT NULL,
    feature text NOT NULL,
    provider text NOT NULL,
    model text NOT NULL,
    price_list_version text NOT NULL,
    placed_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT holds_credits_check CHECK ((credits > 0))
);

CREATE TABLE ledger_entries (
    entry_id uuid NOT NULL,
    event_id uuid,
    kind text NOT NULL,
    user_id text NOT NULL,
    decision text NOT NULL,
    credits bigint NOT NULL,
    price_list_version text,
    reason text,
    provider text,
    model text,
    feature text,
    key_source text,
    status text,
    occurred_at timestamp with time zone,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL,
    seq bigint NOT NULL,
    txid xid8 DEFAULT pg_current_xact_id() NOT NULL,
    balance_after bigint,
    CONSTRAINT ledger_entries_check CHECK (((kind = 'correction'::text) OR (credits >= 0))),
    CONSTRAINT ledger_entries_check1 CHECK (((kind = 'correction'::text) OR (entry_id = event_id))),
    CONSTRAINT ledger_entries_check2 CHECK ((((decision = 'debited'::text) = ((kind = 'decision'::text) AND (credits > 0))) OR (kind = 'correction'::text))),
    CONSTRAINT ledger_entries_check3 CHECK (((kind = 'correction'::text) = (decision = 'correction'::text))),
    CONSTRAINT ledger_entries_check4 CHECK (((decision <> 'debited'::text) OR (price_list_version IS NOT NULL))),
    CONSTRAINT ledger_entries_decision_check CHECK ((decision = ANY (ARRAY['debited'::text, 'not_billed_byok'::text, 'not_billed_failed'::text, 'rejected'::text, 'correction'::text]))),
    CONSTRAINT ledger_entries_kind_check CHECK ((kind = ANY (ARRAY['decision'::text, 'correction'::text])))
);

CREATE SEQUENCE ledger_entries_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE ledger_entries_seq_seq OWNED BY ledger_entries.seq;

CREATE TABLE parked_messages (
    id bigint NOT NULL,
    source text NOT NULL,
    topic text NOT NULL,
    key bytea,
    payload bytea NOT NULL,
    headers jsonb DEFAULT '{}'::jsonb NOT NULL,
    error text NOT NULL,
    parked_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE SEQUENCE parked_messages_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE parked_messages_id_seq OWNED BY parked_messages.id;

CREATE TABLE relay_cursors (
    name text NOT NULL,
    last_txid xid8 DEFAULT '0'::xid8 NOT NULL,
    last_seq bigint DEFAULT 0 NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE schema_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE ONLY chat_outbox ALTER COLUMN id SET DEFAULT nextval('chat_outbox_id_seq'::regclass);

ALTER TABLE ONLY credit_outbox ALTER COLUMN id SET DEFAULT nextval('credit_outbox_id_seq'::regclass);

ALTER TABLE ONLY ledger_entries ALTER COLUMN seq SET DEFAULT nextval('ledger_entries_seq_seq'::regclass);

ALTER TABLE ONLY parked_messages ALTER COLUMN id SET DEFAULT nextval('parked_messages_id_seq'::regclass);

ALTER TABLE ONLY accounts
    ADD CONSTRAINT accounts_pkey PRIMARY KEY (user_id);

ALTER TABLE ONLY auth_revoked_sessions
    ADD CONSTRAINT auth_revoked_sessions_pkey PRIMARY KEY (session_id);

ALTER TABLE ONLY auth_signed_out_everywhere
    ADD CONSTRAINT auth_signed_out_everywhere_pkey PRIMARY KEY (user_id);

ALTER TABLE ONLY chat_calls
    ADD CONSTRAINT chat_calls_event_id_key UNIQUE (event_id);

ALTER TABLE ONLY chat_calls
    ADD CONSTRAINT chat_calls_pkey PRIMARY KEY (user_id, idempotency_key);

ALTER TABLE ONLY chat_instances
    ADD CONSTRAINT chat_instances_pkey PRIMARY KEY (instance_id);

ALTER TABLE ONLY chat_model_settings
    ADD CONSTRAINT chat_model_settings_pkey PRIMARY KEY (user_id);

ALTER TABLE ONLY chat_outbox
    ADD CONSTRAINT chat_outbox_event_id_key UNIQUE (event_id);

ALTER TABLE ONLY chat_outbox
    ADD CONSTRAINT chat_outbox_pkey PRIMARY KEY (id);

ALTER TABLE ONLY chat_session_keys
    ADD CONSTRAINT chat_session_keys_pkey PRIMARY KEY (key_id);

ALTER TABLE ONLY credit_outbox
    ADD CONSTRAINT credit_outbox_pkey PRIMARY KEY (id);

ALTER TABLE ONLY grants
    ADD CONSTRAINT grants_pkey PRIMARY KEY (grant_key);

ALTER TABLE ONLY holds
    ADD CONSTRAINT holds_pkey PRIMARY KEY (event_id);

ALTER TABLE ONLY ledger_entries
    ADD CONSTRAINT ledger_entries_pkey PRIMARY KEY (entry_id);

ALTER TABLE ONLY parked_messages
    ADD CONSTRAINT parked_messages_pkey PRIMARY KEY (id);

ALTER TABLE ONLY relay_cursors
    ADD CONSTRAINT relay_cursors_pkey PRIMARY KEY (name);

ALTER TABLE ONLY schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);

CREATE INDEX auth_revoked_sessions_revoked_at_idx ON auth_revoked_sessions USING btree (revoked_at);

CREATE INDEX auth_signed_out_everywhere_updated_at_idx ON auth_signed_out_everywhere USING btree (updated_at);

CREATE INDEX chat_calls_answers_idx ON chat_calls USING btree (ended_at) WHERE (answer_kept AND (ended_at IS NOT NULL));

CREATE INDEX chat_calls_created_at_idx ON chat_calls USING btree (created_at);

CREATE INDEX chat_outbox_in_flight_idx ON chat_outbox USING btree (created_at) WHERE (NOT ready);

CREATE INDEX chat_outbox_instance_idx ON chat_outbox USING btree (instance_id) WHERE (NOT ready);

CREATE INDEX chat_outbox_ready_idx ON chat_outbox USING btree (id) WHERE ready;

CREATE INDEX chat_session_keys_expires_at_idx ON chat_session_keys USING btree (expires_at);

CREATE UNIQUE INDEX chat_session_keys_one_live_per_provider ON chat_session_keys USING btree (user_id, session_id, provider) WHERE (revoked_at IS NULL);

CREATE INDEX chat_session_keys_user_live_idx ON chat_session_keys USING btree (user_id) WHERE (revoked_at IS NULL);

CREATE INDEX grants_user_idx ON grants USING btree (user_id);

CREATE INDEX holds_placed_at_idx ON holds USING btree (placed_at);

CREATE INDEX holds_user_idx ON holds USING btree (user_id);

CREATE INDEX ledger_entries_correction_event_idx ON ledger_entries USING btree (event_id) WHERE (kind = 'correction'::text);

CREATE INDEX ledger_entries_occurred_at_brin ON ledger_entries USING brin (occurred_at) WITH (pages_per_range='32');

CREATE INDEX ledger_entries_relay_idx ON ledger_entries USING btree (txid, seq) WHERE (kind = 'decision'::text);

CREATE INDEX ledger_entries_user_recent_idx ON ledger_entries USING btree (user_id, recorded_at DESC);

CREATE TRIGGER accounts_guard BEFORE INSERT OR DELETE OR UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION accounts_guard_sums();

CREATE TRIGGER grants_append_only BEFORE DELETE OR UPDATE ON grants FOR EACH ROW EXECUTE FUNCTION refuse_history_change();

CREATE TRIGGER grants_apply AFTER INSERT ON grants REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION grants_apply();

CREATE TRIGGER holds_admit BEFORE INSERT ON holds FOR EACH ROW EXECUTE FUNCTION holds_admit();

CREATE TRIGGER holds_apply_delete AFTER DELETE ON holds REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION holds_apply_delete();

CREATE TRIGGER holds_apply_insert AFTER INSERT ON holds REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION holds_apply_insert();

CREATE TRIGGER holds_no_update BEFORE UPDATE ON holds FOR EACH ROW EXECUTE FUNCTION holds_refuse_update();

CREATE TRIGGER ledger_entries_append_only BEFORE DELETE OR UPDATE ON ledger_entries FOR EACH ROW EXECUTE FUNCTION refuse_history_change();

CREATE TRIGGER ledger_entries_apply AFTER INSERT ON ledger_entries REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_apply_entries();

CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries FOR EACH STATEMENT EXECUTE FUNCTION refuse_history_change();

CREATE TRIGGER ledger_entries_settle_holds AFTER INSERT ON ledger_entries REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_settle_holds();

ALTER TABLE ONLY grants
    ADD CONSTRAINT grants_user_id_fkey FOREIGN KEY (user_id) REFERENCES accounts(user_id);

ALTER TABLE ONLY holds
    ADD CONSTRAINT holds_user_id_fkey FOREIGN KEY (user_id) REFERENCES accounts(user_id);
