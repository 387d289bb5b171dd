-- Finance reconciles a period by the events' occurred_at (`reconcile --from T1 --to T2`, half-open):
-- this index lets it select a window's ledger entries without scanning the whole history.
-- Corrections need no new column: they are kind = 'correction' rows with deterministic entry ids.
CREATE INDEX ledger_entries_occurred_at_idx ON ledger_entries (occurred_at);
