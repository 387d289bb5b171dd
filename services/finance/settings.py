"""Settings of the finance CLI (environment variables, local defaults)."""

from __future__ import annotations

from services.shared.settings import CommonSettings


class FinanceSettings(CommonSettings):
    # The window is on `occurred_at`, but Kafka is sought by record timestamp, which the emitter
    # sets when it publishes: a little before occurred_at at worst (clock skew between hosts),
    # possibly long after it (retries, an outbox catching up). The log is read over
    # [T1 - skew, T2 + lateness) so that every event that occurred in [T1, T2) is seen.
    finance_clock_skew_s: float = 300.0
    finance_lateness_s: float = 3600.0
    # Records per getmany(); large batches keep the per-call overhead negligible.
    finance_fetch_records: int = 20_000
    # Rows per COPY into the temporary table of the window's events.
    finance_copy_rows: int = 50_000
    # The credit service's consumer group: an event it has not consumed yet (at or beyond its
    # committed offset) and with no ledger entry is "not yet decided", not a missing debit.
    # Empty: no such check (every undecided billable event is a missing debit).
    finance_credits_group: str = "credits"  # prefixed by TOPIC_PREFIX, as the credit service does
    # Give up when the log stops advancing for this long before reaching the range's end.
    finance_stall_timeout_s: float = 60.0
    # Reconcile lists admission holds open longer than this (they never expire; see `byok-finance holds`).
    finance_hold_age_s: float = 3600.0
