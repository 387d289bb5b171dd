"""The period a reconciliation covers.

Rule (documented in the CLI help and tested at both edges): the window is half-open,
[start, end), on the event's own `occurred_at`. An event that occurred exactly at `start` is in;
one that occurred exactly at `end` is out (it belongs to the next window, so consecutive windows
[T1, T2), [T2, T3) count every event exactly once). Ledger entries are selected by the same rule
on their `occurred_at` column, which the credit service copies from the event.

An unreadable record has no trustworthy `occurred_at`; it is placed by its Kafka record timestamp,
with the same half-open rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """A naive datetime is taken as UTC (the CLI accepts `2026-11-01` and `2026-11-01T10:00`)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Window:
    start: datetime  # inclusive
    end: datetime  # exclusive

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", as_utc(self.start))
        object.__setattr__(self, "end", as_utc(self.end))
        if self.end <= self.start:
            raise ValueError(f"the window is empty: --to ({self.end:%Y-%m-%dT%H:%M:%S%z}) must be after --from")

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    def contains_ms(self, timestamp_ms: int) -> bool:
        return to_ms(self.start) <= timestamp_ms < to_ms(self.end)

    def log_range_ms(
        self, skew: timedelta, lateness: timedelta, last_recorded: datetime | None = None
    ) -> tuple[int, int]:
        """Kafka timestamps to read, [from, to): wide enough to hold every event of the window.

        `last_recorded`, when the ledger has entries for the window, is when the newest was written:
        its event was in the log by then, however late it was published, so the read goes that far.
        """
        end = self.end + lateness
        if last_recorded is not None:
            end = max(end, last_recorded + skew + timedelta(milliseconds=1))
        return max(0, to_ms(self.start - skew)), to_ms(end)

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"
