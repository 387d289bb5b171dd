-- A hold is placed while a user waits for their call to start, and the chat service gives up on the
-- credit service after CREDITS_TIMEOUT_S (5 s). A placement still waiting for the account's row lock
-- after the chat gave up (a long ledger batch, a stuck transaction) would then commit a hold for a
-- call that never starts, and lock the user's credits until the hold expires (HOLD_TTL_S, 15 min).
-- So place_hold waits at most 3 s for a lock, then fails (lock_not_available), and the credit service
-- answers 503: the client learns, in time, that nothing was held.
ALTER FUNCTION place_hold(uuid, text, bigint, text, text, text, text, double precision) SET lock_timeout = '3s';
