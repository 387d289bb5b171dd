"""Prometheus metrics of the credit service (served at /metrics)."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter("credits_events_consumed_total", "Records read from model_call_completed")
DECISIONS = Counter("credits_decisions_total", "Events decided, by decision", ["decision"])
DUPLICATES = Counter("credits_duplicate_events_total", "Events already decided (redelivery, duplicate, replay)")
DEBITS = Counter("credits_debits_total", "Debit entries written")
CREDITS_DEBITED = Counter("credits_debited_credits_total", "Credits debited")
DLQ = Counter("credits_dlq_total", "Records sent to the dead-letter topic, by reason", ["reason"])
CONSUMER_LAG = Gauge("credits_consumer_lag", "Records in model_call_completed not yet consumed")
BATCH_SECONDS = Histogram(
    "credits_batch_seconds",
    "Time to decide and commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
LEDGER_RETRIES = Counter(
    "credits_ledger_retries_total", "Ledger transactions retried because the database was unreachable"
)
LEDGER_COLLISIONS = Counter(
    "credits_ledger_collisions_total",
    "Ledger transactions written again with a lookup because an event in them was already decided (redelivery)",
)
ISOLATIONS = Counter(
    "credits_ledger_isolation_splits_total",
    "Ledger transactions refused for their content and split to find the record(s) at fault",
)
STALLED = Gauge("credits_stalled", "1 while events wait and no ledger transaction has committed for the stall limit")
STALL_SECONDS = Gauge("credits_stall_seconds", "Seconds events have waited without a ledger commit (0 when none wait)")
LAST_COMMIT_AGE = Gauge("credits_last_commit_age_seconds", "Seconds since the last ledger transaction committed")
# Admission holds have no expiry (migrations/0014): a hold whose event never comes would stay, so these say
# how many are open and how old the oldest is (read from the database at each scrape; every instance
# reports the same, database-wide figures). Alert on the age, well above the longest call.
HOLDS_OPEN = Gauge("credits_holds_open", "Admission holds open (calls running or not yet decided), database-wide")
HOLDS_CREDITS = Gauge("credits_holds_held_credits", "Credits held by the open admission holds, database-wide")
OLDEST_HOLD_AGE = Gauge(
    "credits_oldest_hold_age_seconds", "Age of the oldest open admission hold (0 when none is open), database-wide"
)
