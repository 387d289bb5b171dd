-- Outcomes are published from the ledger itself: every decision row is the outbox record of its
-- CreditOutcome, so writing a decision and "queueing" its outcome are the same insert.
--
-- The relay reads rows in (txid, seq) order and only rows whose transaction is older than every
-- transaction still running (txid < pg_snapshot_xmin(pg_current_snapshot())): such rows are final,
-- and any row that becomes visible later has a larger txid, so a cursor on (txid, seq) never skips
-- one, even with several writers committing out of order.

ALTER TABLE ledger_entries
    ADD COLUMN seq bigserial,
    ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    ADD COLUMN balance_after bigint;

-- The primary key already makes decisions unique per event (a decision's entry_id is its event_id, by
-- a CHECK of 0001), so this second unique index only cost every insert an index update.
DROP INDEX ledger_entries_one_decision_per_event;
-- Likewise a decision is found by its primary key; only corrections need looking up by event.
DROP INDEX ledger_entries_event_idx;
CREATE INDEX ledger_entries_correction_event_idx ON ledger_entries (event_id) WHERE kind = 'correction';

CREATE INDEX ledger_entries_relay_idx ON ledger_entries (txid, seq) WHERE kind = 'decision';

CREATE TABLE relay_cursors (
    name       text PRIMARY KEY,
    last_txid  xid8 NOT NULL DEFAULT '0',
    last_seq   bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- credit_outbox now carries dead letters (the original bytes and the error in headers).
ALTER TABLE credit_outbox ADD COLUMN headers jsonb NOT NULL DEFAULT '{}';
