"""Conflicting duplicates: events that reused an event id already decided for another call.

The credit service decides an event id once. A later event with that id and the same identity (user,
feature, model, key source, provider, status) is a duplicate and changes nothing; one with another
identity is a conflict: the first decision stands and the credit service dead-letters the other to
`model_call_completed.dlq` with `dlq.error_type=conflict` (its original bytes, the reason in
`dlq.error`). Finance reads them back from there: the dead-letter topic is kept forever, like the log.

A conflict is not a difference of money (the ledger holds what the first event owes, which reconcile
checks as usual), so it does not make reconcile fail; it is a bug of an emitter (or someone forging
events) that a person must look at, so `byok-finance conflicts` exits 1 when it finds one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from uuid import UUID

from schemas.topics import dlq
from services.finance.assessment import _event_id_of
from services.finance.event_log import EventLog, LogRecord, TopicMissing
from services.finance.settings import FinanceSettings
from services.finance.window import Window
from services.shared.kafka import NotAnEvent, read_model_call

CONFLICT = "conflict"  # the credit service's dlq.error_type for these (services/credits/decisions.py)


@dataclass(frozen=True)
class Conflict:
    """One conflicting event as the DLQ holds it: what it claimed, and why it was refused."""

    event_id: UUID | None
    user_id: str | None
    occurred_at: datetime | None
    feature: str | None
    model: str | None
    key_source: str | None
    provider: str | None
    status: str | None
    error: str
    source_partition: int | None
    source_offset: int | None
    dead_lettered_at: datetime

    def as_row(self) -> dict[str, object]:
        return asdict(self)


def _header(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name:
            return value.decode(errors="replace") if value is not None else None
    return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def conflict_of(record: LogRecord) -> Conflict | None:
    """The conflict a DLQ record holds, or None when it is a dead letter of another kind."""
    if _header(record.headers, "dlq.error_type") != CONFLICT:
        return None
    event = read_model_call(record.value)
    at = datetime.fromtimestamp(record.timestamp / 1000, timezone.utc)
    error = _header(record.headers, "dlq.error") or ""
    partition = _int(_header(record.headers, "dlq.source_partition"))
    offset = _int(_header(record.headers, "dlq.source_offset"))
    if isinstance(event, NotAnEvent):  # the credit service validated it first, so this is not expected
        eid = _event_id_of(record.value or b"")
        return Conflict(eid, None, None, None, None, None, None, None, error, partition, offset, at)
    return Conflict(
        event.event_id,
        event.user_id,
        event.occurred_at,
        event.feature.value,
        event.model,
        event.key_source.value,
        event.provider.value,
        event.status.value,
        error,
        partition,
        offset,
        at,
    )


async def read_conflicts(settings: FinanceSettings, window: Window | None = None) -> list[Conflict]:
    """Every conflict dead-lettered for an event of `window` (by its occurred_at, half-open; None: all).

    The DLQ is read from the window's start less the clock skew (a conflict is dead-lettered after its
    event was published) to its end. A deployment whose DLQ topic does not exist has no conflicts.
    """
    from_ms = None
    if window is not None:
        from_ms = int((window.start - timedelta(seconds=settings.finance_clock_skew_s)).timestamp() * 1000)
    found: list[Conflict] = []
    try:
        async with EventLog(
            settings.kafka_bootstrap_servers,
            dlq(settings.model_call_completed_topic),
            fetch_records=settings.finance_fetch_records,
            stall_timeout_s=settings.finance_stall_timeout_s,
        ) as log:
            ranges = await log.plan(max(from_ms, 0) if from_ms is not None else None, None)
            async for records in log.read(ranges):
                for record in records:
                    c = conflict_of(record)
                    if c is None:
                        continue
                    if window is not None and (c.occurred_at is None or not window.contains(c.occurred_at)):
                        continue
                    found.append(c)
    except TopicMissing:
        return []
    return sorted(found, key=lambda c: (c.dead_lettered_at, str(c.event_id)))
