"""From one Kafka record to what the credit policy says its event owes.

The policy itself is `billing.policy.decide`, the very function the credit service runs;
nothing here re-implements it. A record that cannot be read (empty, oversized, not JSON, not a
`ModelCallCompleted`) becomes an `Unreadable` finding instead of an exception: one bad record never
stops a reconciliation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from billing.policy import Charge, decide
from billing.pricing import PriceBook, PriceList
from schemas.events import CallStatus, Decision, Ending, Feature, KeySource, ModelCallCompleted, Provider
from services.finance.event_log import LogRecord
from services.finance.window import Window
from services.shared.kafka import NotAnEvent, read_model_call

# Columns of one assessed event, in the order of `Assessor.assess` rows (the COPY layout). What
# the event owes and its descriptive fields are a `Shape`, stored once and referred to by number:
# a window of millions of events has a few hundred shapes, and a narrow row is a cheap COPY.
EVENT_COLUMNS = ("event_id", "user_id", "occurred_at", "shape", "credits", "part", "off")
UNKNOWN_ENDING = "unknown"  # an event that says nothing of how its call ended
# One assessed event in EVENT_COLUMNS order.
EventRow = tuple[UUID, str, datetime, int, int, int, int]
# What makes two events one shape: price list version, status, feature, key source, model, provider.
ShapeKey = tuple[str, CallStatus, Feature, KeySource, str, Provider]


@dataclass(frozen=True, slots=True)
class Shape:
    """What an event of this shape owes (by `decide`) and the fields that make it so."""

    decision: str
    credits: int
    price_list_version: str | None
    reason: str | None
    provider: str
    model: str
    feature: str
    key_source: str
    status: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record of the log that is not a readable `ModelCallCompleted`."""

    partition: int
    offset: int
    timestamp_ms: int
    error: str
    # Recovered from the raw JSON when possible, so a ledger entry for it is not reported twice.
    event_id: UUID | None = None


@dataclass
class Tally:
    records: int = 0
    in_window: int = 0  # events of the window, redeliveries included
    duplicates: int = 0  # redeliveries of an event already read (the first delivery counts)
    outside_window: int = 0
    unreadable: int = 0
    # Events of the window (first deliveries) by `ending` (DESIGN "The call lifecycle"); an event without
    # one (an older emitter) counts as UNKNOWN_ENDING. Counted, not judged: the policy bills by status.
    endings: dict[str, int] = field(default_factory=dict)

    def add(self, other: Tally) -> None:
        self.records += other.records
        self.in_window += other.in_window
        self.duplicates += other.duplicates
        self.outside_window += other.outside_window
        self.unreadable += other.unreadable
        for ending, n in other.endings.items():
            self.endings[ending] = self.endings.get(ending, 0) + n

    def ending_counts(self) -> dict[str, int]:
        """Events per ending: every known ending (0 if none), then `unknown`, in a stable order."""
        counts = {e.value: self.endings.get(e.value, 0) for e in Ending}
        counts[UNKNOWN_ENDING] = self.endings.get(UNKNOWN_ENDING, 0)
        return counts


def _event_id_of(value: bytes | None) -> UUID | None:
    if value is None:
        return None
    try:
        return UUID(str(json.loads(value)["event_id"]))
    except Exception:  # anything unreadable just has no recoverable id
        return None


class Shapes:
    """What events owe, by `decide`, computed once per distinct shape: (price list in force, status,
    feature, key source, model, provider).

    `decide` is a pure function of the price list in force, status, feature, key source and model
    (billing/policy.py; a unit test holds it to that), and a window of millions of events
    has only a few hundred shapes, so the policy runs a few hundred times instead of millions: the
    same answers, far cheaper.
    """

    def __init__(self, book: PriceBook, window: Window | None = None):
        self.book = book
        self.shapes: list[Shape] = []
        self._ids: dict[ShapeKey, int] = {}
        # When no price list takes effect inside the window, one list is in force for all of it.
        starts = [p.effective_from for p in book.lists]
        if window is not None and not any(window.start < s < window.end for s in starts):
            self._fixed: PriceList | None = book.in_force(window.start)
        else:
            self._fixed = book.lists[0] if len(book.lists) == 1 else None

    def of(self, event: ModelCallCompleted) -> int:
        """The number of `event`'s shape (see `shapes`)."""
        prices = self._fixed or self.book.in_force(event.occurred_at)
        key = (prices.version, event.status, event.feature, event.key_source, event.model, event.provider)
        shape = self._ids.get(key)
        if shape is None:
            c = decide(event, self.book)
            self.shapes.append(
                Shape(
                    c.decision.value,
                    c.credits,
                    c.price_list_version,
                    c.reason,
                    event.provider.value,
                    event.model,
                    event.feature.value,
                    event.key_source.value,
                    event.status.value,
                )
            )
            shape = self._ids[key] = len(self.shapes) - 1
        return shape

    def charge(self, shape: int) -> Charge:
        s = self.shapes[shape]
        return Charge(Decision(s.decision), s.credits, s.price_list_version, s.reason)


class Assessor:
    """Reads records and applies the policy; `window=None` keeps every event (replay).

    Redeliveries are dropped here, keeping the first delivery read (for one event id, that is the
    lowest offset, as the emitter keys an event's redeliveries alike), so the events table holds
    each event once. The ids are kept as ints: about 80 bytes per event of the window.
    """

    def __init__(self, book: PriceBook, window: Window | None = None):
        self.book, self.window = book, window
        self.shapes = Shapes(book, window)
        self.seen: set[int] = set()

    def has_event(self, event_id: UUID) -> bool:
        return event_id.int in self.seen

    def assess(self, records: Sequence[LogRecord]) -> tuple[list[EventRow], list[Unreadable], Tally]:
        rows: list[EventRow] = []
        unreadable: list[Unreadable] = []
        tally = Tally(records=len(records))
        window, shape_of, seen, shapes = self.window, self.shapes.of, self.seen, self.shapes.shapes
        endings = tally.endings
        for r in records:
            value = r.value
            event = read_model_call(value)  # the credit service reads records with this same function
            if isinstance(event, NotAnEvent):
                if window is None or window.contains_ms(r.timestamp):
                    eid = _event_id_of(value) if event.kind in ("malformed_json", "schema") else None
                    unreadable.append(Unreadable(r.partition, r.offset, r.timestamp, event.message, eid))
                    tally.unreadable += 1
                else:
                    tally.outside_window += 1
                continue
            if window is not None and not window.contains(event.occurred_at):
                tally.outside_window += 1
                continue
            tally.in_window += 1
            key = event.event_id.int
            if key in seen:
                tally.duplicates += 1
                continue
            seen.add(key)
            ending = event.ending.value if event.ending is not None else UNKNOWN_ENDING
            endings[ending] = endings.get(ending, 0) + 1
            shape = shape_of(event)
            rows.append(
                (event.event_id, event.user_id, event.occurred_at, shape, shapes[shape].credits, r.partition, r.offset)
            )
        return rows, unreadable, tally
