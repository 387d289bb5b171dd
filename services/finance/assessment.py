"""From one Kafka record to what the credit policy says its event owes.

The policy itself is `services.credits.policy.decide`, the very function the credit service runs;
nothing here re-implements it. A record that cannot be read (empty, oversized, not JSON, not a
`ModelCallCompleted`) becomes an `Unreadable` finding instead of an exception: one bad record never
stops a reconciliation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from uuid import UUID

from pydantic import ValidationError

from schemas.events import ModelCallCompleted
from schemas.pricing import PriceBook
from services.credits.policy import Charge, decide
from services.finance.window import Window
from services.shared.kafka import MAX_EVENT_BYTES

# Columns of one assessed event, in the order of `Assessor.assess` rows (the COPY layout).
EVENT_COLUMNS = (
    "event_id", "user_id", "occurred_at", "decision", "credits", "price_list_version", "reason",
    "provider", "model", "feature", "key_source", "status", "part", "off",
)


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
    in_window: int = 0
    outside_window: int = 0
    unreadable: int = 0

    def add(self, other: Tally) -> None:
        self.records += other.records
        self.in_window += other.in_window
        self.outside_window += other.outside_window
        self.unreadable += other.unreadable


def _event_id_of(value: bytes) -> UUID | None:
    try:
        return UUID(str(json.loads(value)["event_id"]))
    except Exception:  # anything unreadable just has no recoverable id
        return None


def _summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


class Charges:
    """What events owe, by `decide`, computed once per distinct (price list in force, status,
    feature, key source, model).

    `decide` is a pure function of exactly those (services/credits/policy.py; a unit test holds it
    to that), and a window of millions of events has only a few hundred distinct combinations, so
    the policy runs a few hundred times instead of millions: the same answers, far cheaper.
    """

    def __init__(self, book: PriceBook, window: Window | None = None):
        self.book = book
        self._memo: dict[tuple, Charge] = {}
        # When no price list takes effect inside the window, one list is in force for all of it.
        starts = [p.effective_from for p in book.lists]
        if window is not None and not any(window.start < s < window.end for s in starts):
            self._fixed = book.in_force(window.start)
        else:
            self._fixed = book.lists[0] if len(book.lists) == 1 else None

    def of(self, event: ModelCallCompleted) -> Charge:
        prices = self._fixed or self.book.in_force(event.occurred_at)
        key = (prices.version, event.status, event.feature, event.key_source, event.model)
        charge = self._memo.get(key)
        if charge is None:
            charge = self._memo[key] = decide(event, self.book)
        return charge


class Assessor:
    """Reads records and applies the policy; `window=None` keeps every event (replay)."""

    def __init__(self, book: PriceBook, window: Window | None = None):
        self.book, self.window = book, window
        self.charges = Charges(book, window)

    def assess(self, records) -> tuple[list[tuple], list[Unreadable], Tally]:
        rows: list[tuple] = []
        unreadable: list[Unreadable] = []
        tally = Tally(records=len(records))
        window, charge_of = self.window, self.charges.of
        for r in records:
            value = r.value
            error = None
            if not value:
                error = "empty value"
            elif len(value) > MAX_EVENT_BYTES:
                error = f"value of {len(value)} bytes exceeds {MAX_EVENT_BYTES}"
            else:
                try:
                    event = ModelCallCompleted.model_validate_json(value)
                    # The schema lets a NUL character through, PostgreSQL text cannot hold one: such
                    # an event could not be compared (nor recorded by the credit service).
                    if "\x00" in event.user_id or "\x00" in event.model:
                        error = "user_id or model contains a NUL character"
                except ValidationError as exc:
                    error = _summary(exc)
            if error is not None:
                if window is None or window.contains_ms(r.timestamp):
                    eid = _event_id_of(value) if value and len(value) <= MAX_EVENT_BYTES else None
                    unreadable.append(Unreadable(r.partition, r.offset, r.timestamp, error, eid))
                    tally.unreadable += 1
                else:
                    tally.outside_window += 1
                continue
            if window is not None and not window.contains(event.occurred_at):
                tally.outside_window += 1
                continue
            charge = charge_of(event)
            # The enums are StrEnums, so they go to the text columns as they are (no `.value`: that
            # property lookup was a visible share of the time per event).
            rows.append((
                event.event_id, event.user_id, event.occurred_at, charge.decision, charge.credits,
                charge.price_list_version, charge.reason, event.provider, event.model,
                event.feature, event.key_source, event.status, r.partition, r.offset,
            ))
        tally.in_window = len(rows)
        return rows, unreadable, tally
