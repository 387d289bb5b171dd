-- The outcome relay (services/credits/relay.py) is woken by NOTIFY credit_outcomes when decisions
-- commit. Sent by the statement trigger that already runs for every insert into the ledger, it costs
-- the writer no round trip of its own, and no writer can forget it. PostgreSQL folds repeated
-- notifications of one transaction into one, delivered at commit.
CREATE OR REPLACE FUNCTION ledger_apply_entries() RETURNS trigger LANGUAGE plpgsql AS $$
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
