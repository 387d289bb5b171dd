-- The usage history (GET /api/usage/{user_id}: a user's last 50 decided calls) reads entries by user,
-- newest first. 0005 dropped the per-user index because nothing read by user then; without one this
-- read scans the whole, ever-growing ledger. The index costs each ledger insert one btree entry
-- again (see bench/credits.py for the write figures).
CREATE INDEX ledger_entries_user_recent_idx ON ledger_entries (user_id, recorded_at DESC);
