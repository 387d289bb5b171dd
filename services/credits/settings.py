"""Settings of the credit service (environment variables, local defaults)."""

from __future__ import annotations

from typing import ClassVar, Literal

from services.shared.settings import CommonSettings, HttpSettings


class CreditSettings(CommonSettings, HttpSettings):
    SECRETS: ClassVar[tuple[str, ...]] = (*CommonSettings.SECRETS, *HttpSettings.SECRETS)
    http_host: str = "127.0.0.1"
    http_port: int = 8001
    consumer_group: str = "credits"
    # Static group membership (KIP-345): an instance restarted with the same id takes its partitions
    # back at once instead of waiting out the session timeout. Unique per running instance: the
    # instance's name (CREDITS_INSTANCE, e.g. credits-1 from the stack, a container's hostname under
    # Docker), or CONSUMER_INSTANCE_ID to set the id itself. Neither: a dynamic member.
    credits_instance: str | None = None
    consumer_instance_id: str | None = None
    session_timeout_ms: int = 10_000
    # Fetched batches are validated as they come and written by group commit (consumer.CommitPipeline):
    # whatever piled up while one ledger transaction ran goes into the next. A poll returns as soon as
    # records arrive (consumer.poll_without_idle_sleep), so its timeout only sets how often a quiet
    # consumer wakes. The broker, too, answers a fetch as soon as a record arrives, so the fetch wait
    # mostly sets how often a quiet consumer asks: every 20 ms cost this service about 20 ms of CPU a
    # second with no traffic, and the broker some more (issue 22). It is not longer because aiokafka
    # leaves a partition whose records were just handed over out of the fetch it then sends, and
    # fetches it again only once that one returns: a record landing there in between waits up to this
    # long (the key-check consumers, at 500 ms, showed a p99 of 55 ms twice; at 100 ms, as at 20 ms,
    # 10-14 ms, with one run in four at 50 ms either way).
    batch_max_records: int = 5000
    batch_timeout_ms: int = 500
    max_queued_events: int = 20_000  # validated, not yet in the ledger; fetching pauses beyond it
    fetch_max_wait_ms: int = 100
    # "process": the outcome relay runs in a child process, off the consumer's CPU; "task": in the
    # consumer's own event loop; "off": not here (another instance relays).
    relay_mode: Literal["process", "task", "off"] = "process"
    relay_start_delay_s: float = 2.0  # "process" mode: the consumer starts first
    relay_batch: int = 5000
    relay_idle_poll_s: float = 0.5  # a safety net: the ledger's NOTIFY wakes the relay at each commit
    db_pool_size: int = 5
    # Admission holds (DESIGN.md) have no time limit (migrations/0014): a hold is released by its event's
    # decision or by DELETE /api/holds/{event_id}; HOLD_TTL_S and HOLD_SWEEP_S are gone (ignored if set).
    # GET /api/admin/holds lists holds older than this by default; /metrics reports the oldest one.
    hold_report_after_s: float = 3600.0
    # /healthz answers 503 when events wait and no ledger transaction has committed for this long.
    stall_after_s: float = 30.0
    # The compatibility route waits this long for its event's decision before answering 202.
    deduct_wait_s: float = 10.0

    @property
    def group_instance_id(self) -> str | None:
        if self.consumer_instance_id:
            return self.consumer_instance_id
        return self.credits_instance or None
