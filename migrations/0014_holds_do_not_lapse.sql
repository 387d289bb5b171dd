-- Holds cannot lapse while their call can still be billed (DESIGN.md "The call lifecycle": "A hold lives
-- as long as its call can still be billed"). Until now a hold carried expires_at (placed + HOLD_TTL_S,
-- 900 s) and the credit service deleted holds past it. But an event may wait in the chat's outbox while
-- Kafka or the credit consumer is down for longer than that: its hold lapsed, the user's available
-- credits came back, and new calls could spend what the late event then debited (overspend).
--
-- Now the chat commits a call's outbox row before its hold is placed, and an event it cannot vouch for is
-- published as failed (ending not_started), so every hold's event is eventually decided. A hold is
-- released only by the ledger transaction that decides its event (trigger ledger_entries_settle_holds,
-- migrations/0011) or by DELETE /api/holds/{event_id}. There is no time bound left to keep:
--   * holds.expires_at and its index go;
--   * place_hold takes no TTL (the 8-argument version is dropped, not kept beside the new one: a caller
--     still passing a TTL fails loudly instead of believing its hold will expire);
--   * placed_at gets the index instead: operators list old holds and /metrics reports the oldest one
--     (GET /api/admin/holds, byok-finance holds), since a hold whose event never comes now stays until
--     someone looks.

DROP INDEX holds_expires_at_idx;
ALTER TABLE holds DROP COLUMN expires_at;
CREATE INDEX holds_placed_at_idx ON holds (placed_at);

DROP FUNCTION place_hold(uuid, text, bigint, text, text, text, text, double precision);

-- One round trip for the credit service's POST /api/holds: place (or find) the hold and say what is
-- left. Refusals are the trigger's exceptions (HINT insufficient_credits or already_decided).
CREATE FUNCTION place_hold(p_event uuid, p_user text, p_credits bigint, p_feature text, p_provider text,
                           p_model text, p_version text)
RETURNS TABLE (created boolean, holder text, held_credits bigint, available bigint)
LANGUAGE plpgsql AS $$
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

-- As migrations/0013 set for the old signature: a placement waits at most 3 s for the account's lock,
-- then fails (lock_not_available) and the credit service answers 503, nothing held.
ALTER FUNCTION place_hold(uuid, text, bigint, text, text, text, text) SET lock_timeout = '3s';
