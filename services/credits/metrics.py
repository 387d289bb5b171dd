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
ISOLATIONS = Counter(
    "credits_ledger_isolation_splits_total",
    "Ledger transactions refused for their content and split to find the record(s) at fault",
)
STALLED = Gauge("credits_stalled", "1 while events wait and no ledger transaction has committed for the stall limit")
STALL_SECONDS = Gauge("credits_stall_seconds", "Seconds events have waited without a ledger commit (0 when none wait)")
LAST_COMMIT_AGE = Gauge("credits_last_commit_age_seconds", "Seconds since the last ledger transaction committed")
