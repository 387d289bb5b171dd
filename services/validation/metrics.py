"""Prometheus metrics of the validation worker (served at `GET /metrics`)."""

from prometheus_client import Counter, Histogram

CHECKS = Counter("key_checks_total", "Key checks answered", ["provider", "status", "source"])
DEAD_LETTERS = Counter("key_check_dead_letters_total", "Key-check requests sent to the DLQ", ["reason"])
HANDLE_SECONDS = Histogram(
    "key_check_handle_seconds",
    "Time from a request's receipt to its reply being sent",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
