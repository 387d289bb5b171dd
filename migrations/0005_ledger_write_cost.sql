-- What each ledger row costs to write. Measured with COPY of 100,000 decision rows in batches of
-- 5,000 (figures in bench/credits.py and the credits issue note): the per-row foreign-key check
-- and two btree indexes took about half of PostgreSQL's time per row.

-- 1. "Every entry belongs to an existing account" is checked once per statement instead of once per
--    row. The per-row RI trigger ran a SELECT ... FOR KEY SHARE on accounts for every entry; the
--    statement trigger that already sums the new rows per user now also refuses the whole statement
--    when one of its users has no account. Accounts cannot be deleted (accounts_guard), so nothing
--    the foreign key's lock protected against can happen in between.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_user_id_fkey;

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
    RETURN NULL;
END $$;

-- 2. No query reads entries by user (balances live in accounts); the index only cost every insert.
DROP INDEX ledger_entries_user_idx;

-- 3. Finance selects windows of occurred_at. Entries arrive in roughly occurred_at order, which is
--    what a BRIN index is for: a few pages instead of a btree entry per row. It is lossy, so a late
--    event only widens the block ranges read; the query's own predicate keeps the result exact.
DROP INDEX ledger_entries_occurred_at_idx;
CREATE INDEX ledger_entries_occurred_at_brin ON ledger_entries USING brin (occurred_at) WITH (pages_per_range = 32);
