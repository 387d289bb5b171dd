-- Deciding an event settles its admission hold (DESIGN.md "Admission holds"), now kept by the database
-- itself: every statement that inserts ledger entries releases the holds of the events it decides,
-- whoever writes them. Before, the credit service's ledger writer deleted the holds in a statement of
-- its own (one more round trip per ledger transaction, and a writer that forgot would leak a hold).
--
-- A trigger of its own, beside ledger_entries_apply, so the two stay small and a test can switch this
-- one off to make the leak that finance's reconcile must still report (a hold left by a decided event).
-- The DELETE fires holds_apply_delete, which lowers accounts.held; the writer already holds those
-- accounts' row locks (it locks them before deciding), so no new lock order appears.
CREATE FUNCTION ledger_settle_holds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM holds h USING new_rows n WHERE h.event_id = n.entry_id AND n.kind = 'decision';
    RETURN NULL;
END $$;

CREATE TRIGGER ledger_entries_settle_holds AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_settle_holds();
