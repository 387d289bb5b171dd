-- Admission holds (DESIGN.md "Admission holds"): a billable call may start only once its price is
-- reserved against the user's available credits, available = balance - held.
--
-- Held by the database itself, whatever the client does:
--   * a hold is placed only when the account's available credits cover it, checked under the account's
--     row lock, so concurrent placements (from any number of chat instances) are serialised per user;
--   * a hold for an event the ledger has already decided is refused;
--   * accounts.held is the sum of the account's holds, maintained only by the triggers below.
-- The ledger transaction that decides an event deletes its hold (services/credits/ledger.py), and the
-- credit service deletes holds past expires_at; a hold is never debited itself.

ALTER TABLE accounts ADD COLUMN held bigint NOT NULL DEFAULT 0 CHECK (held >= 0);

CREATE TABLE holds (
    event_id            uuid PRIMARY KEY,
    user_id             text NOT NULL REFERENCES accounts (user_id),
    credits             bigint NOT NULL CHECK (credits > 0),
    feature             text NOT NULL,
    provider            text NOT NULL,
    model               text NOT NULL,
    price_list_version  text NOT NULL,
    placed_at           timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL
);
CREATE INDEX holds_user_idx ON holds (user_id);
CREATE INDEX holds_expires_at_idx ON holds (expires_at);

CREATE FUNCTION holds_admit() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE TRIGGER holds_admit BEFORE INSERT ON holds FOR EACH ROW EXECUTE FUNCTION holds_admit();

-- accounts.held follows the holds set-wise, once per statement (a ledger batch releases thousands).
CREATE FUNCTION holds_apply_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts a SET held = a.held + s.total, updated_at = now()
      FROM (SELECT user_id, sum(credits) AS total FROM new_rows GROUP BY user_id) s
     WHERE a.user_id = s.user_id;
    RETURN NULL;
END $$;

CREATE FUNCTION holds_apply_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts a SET held = a.held - s.total, updated_at = now()
      FROM (SELECT user_id, sum(credits) AS total FROM old_rows GROUP BY user_id) s
     WHERE a.user_id = s.user_id;
    RETURN NULL;
END $$;

CREATE TRIGGER holds_apply_insert AFTER INSERT ON holds
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION holds_apply_insert();
CREATE TRIGGER holds_apply_delete AFTER DELETE ON holds
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION holds_apply_delete();

-- A hold is placed or released, never changed.
CREATE FUNCTION holds_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a hold is placed or released, never changed' USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER holds_no_update BEFORE UPDATE ON holds FOR EACH ROW EXECUTE FUNCTION holds_refuse_update();

-- accounts.held, like the sums, may change only from inside the triggers above (trigger depth 2).
CREATE OR REPLACE FUNCTION accounts_guard_sums() RETURNS trigger LANGUAGE plpgsql AS $$
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

-- One round trip for the credit service's POST /api/holds: place (or find) the hold and say what is
-- left. Refusals are the trigger's exceptions (HINT insufficient_credits or already_decided).
CREATE FUNCTION place_hold(p_event uuid, p_user text, p_credits bigint, p_feature text, p_provider text,
                           p_model text, p_version text, p_ttl_s double precision)
RETURNS TABLE (created boolean, holder text, held_credits bigint, available bigint)
LANGUAGE plpgsql AS $$
BEGIN
    created := false;
    IF NOT EXISTS (SELECT 1 FROM holds WHERE event_id = p_event) THEN
        -- No row back: the trigger found the same hold placed meanwhile.
        INSERT INTO holds (event_id, user_id, credits, feature, provider, model, price_list_version, expires_at)
        VALUES (p_event, p_user, p_credits, p_feature, p_provider, p_model, p_version,
                now() + make_interval(secs => p_ttl_s))
        RETURNING true INTO created;
        created := coalesce(created, false);
    END IF;
    SELECT h.user_id, h.credits INTO holder, held_credits FROM holds h WHERE h.event_id = p_event;
    SELECT a.balance - a.held INTO available FROM accounts a WHERE a.user_id = p_user;
    RETURN NEXT;
END $$;
