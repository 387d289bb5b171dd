"""The use cases of a window: reconcile it, repair it, list its open holds (replay: services.finance.replay).

Each takes the typed settings and an optional progress port, builds its clients at start and closes
them at the end; the CLI only translates arguments into these calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from uuid import UUID

import asyncpg

from billing.pricing import PriceBook, default_price_book
from services.finance import holds as hold_store, ledger
from services.finance.assessment import Assessor, Tally, Unreadable
from services.finance.conflicts import Conflict, read_conflicts
from services.finance.differences import Correction, Difference, Kind, correction_for
from services.finance.event_log import committed_offsets
from services.finance.loading import connect, load_events
from services.finance.progress import NoProgress, Progress
from services.finance.settings import FinanceSettings
from services.finance.window import Window


@dataclass
class ReconcileReport:
    window: Window
    topic: str
    tally: Tally
    differences: list[Difference]
    # Events the credit service has not consumed yet: listed apart, not differences.
    pending: list[Difference] = field(default_factory=list)
    ledger_entries: int = 0
    duplicate_deliveries: int = 0
    log_records_planned: int = 0
    elapsed_s: float = 0.0
    # Where the time went: reading + assessing + copying the log, then the comparison query.
    phases: dict[str, float] = field(default_factory=dict)
    # Admission holds of events already decided (a leak: repair releases them), and holds open longer
    # than FINANCE_HOLD_AGE_S (reported only: a hold never expires, its event may still come).
    old_holds: list[asyncpg.Record] = field(default_factory=list)
    decided_holds: list[asyncpg.Record] = field(default_factory=list)
    # Events that reused a decided event id for another call (dead-lettered as `conflict`): reported
    # for a person, not differences (the ledger holds what the first event owes), never repaired.
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.differences and not self.decided_holds

    def counts(self) -> dict[Kind, tuple[int, int]]:
        """Per kind: (differences, credits the corrections would move)."""
        out: dict[Kind, tuple[int, int]] = {k: (0, 0) for k in Kind if k is not Kind.NOT_YET_DECIDED}
        for d in self.differences:
            n, credits = out[d.kind]
            out[d.kind] = (n + 1, credits + (d.correction_credits if d.repairable else 0))
        return out


@dataclass
class RepairResult:
    report: ReconcileReport
    corrections: list[Correction]
    applied: bool
    written: int = 0
    not_repaired: list[Difference] = field(default_factory=list)
    holds_released: int = 0


def _unreadable_differences(
    unreadable: list[Unreadable], ledger_only: dict[UUID, list[Difference]]
) -> list[Difference]:
    """One difference per unreadable record, carrying the ledger entries held under its id, if any."""
    out: list[Difference] = []
    for u in unreadable:
        held = ledger_only.pop(u.event_id, []) if u.event_id else []
        out.append(
            Difference(
                kind=Kind.UNREADABLE_EVENT,
                event_id=u.event_id,
                user_id=",".join(sorted({h.user_id for h in held if h.user_id is not None})) or None,
                occurred_at=min((h.occurred_at for h in held if h.occurred_at), default=None),
                ledger_credits=sum(h.ledger_credits for h in held),
                ledger_entries=sum(h.ledger_entries for h in held),
                partition=u.partition,
                offset=u.offset,
                detail=f"{u.error} (partition {u.partition}, offset {u.offset}, Kafka time "
                f"{datetime.fromtimestamp(u.timestamp_ms / 1000, timezone.utc).isoformat()})",
            )
        )
    return out


async def reconcile(
    settings: FinanceSettings,
    window: Window,
    progress: Progress | None = None,
    book: PriceBook | None = None,
) -> ReconcileReport:
    """Compare what the window's events owe (by the credit policy) with what the ledger holds."""
    began = time.perf_counter()
    progress = progress or NoProgress()
    conn = await connect(settings)
    try:
        # An event published later than the lateness allowance would otherwise be missed, and the
        # debit it rightly caused reported (and refunded by repair) as a debit with no event.
        from_ms, to_ms = window.log_range_ms(
            timedelta(seconds=settings.finance_clock_skew_s),
            timedelta(seconds=settings.finance_lateness_s),
            await ledger.last_recorded_at(conn, window),
        )
        assessor = Assessor(book or default_price_book(), window)
        tally, unreadable, planned = await load_events(settings, conn, assessor, from_ms, to_ms, progress)
        loaded = time.perf_counter()
        diffs = await ledger.compare(conn, window, assessor.shapes.shapes, assessor.has_event)
        compared = time.perf_counter()
        # Entries of an unreadable event are reported once, with that event, not as "no event".
        unreadable_ids = {u.event_id for u in unreadable if u.event_id}
        ledger_only: dict[UUID, list[Difference]] = {}
        kept: list[Difference] = []
        for d in diffs:
            if d.expected_decision is None and d.event_id in unreadable_ids:
                ledger_only.setdefault(d.event_id, []).append(d)
            else:
                kept.append(d)
        kept += _unreadable_differences(unreadable, ledger_only)
        kept, pending = await _set_apart_undecided(settings, kept)
        entries = await ledger.ledger_entry_count(conn, window)
        holds = await hold_store.stale_holds(conn, settings.finance_hold_age_s)
    finally:
        await conn.close()
    conflicts = await read_conflicts(settings, window)
    return ReconcileReport(
        window,
        settings.model_call_completed_topic,
        tally,
        kept,
        pending,
        entries,
        tally.duplicates,
        planned,
        time.perf_counter() - began,
        {"read_s": loaded - began, "compare_s": compared - loaded},
        holds["old"],
        holds["decided"],
        conflicts,
    )


async def _set_apart_undecided(
    settings: FinanceSettings, diffs: list[Difference]
) -> tuple[list[Difference], list[Difference]]:
    """Split off the missing debits the credit service simply has not reached yet."""
    candidates = [d for d in diffs if d.kind is Kind.MISSING_DEBIT and d.ledger_entries == 0]
    if not settings.finance_credits_group or not candidates:
        return diffs, []
    committed = await committed_offsets(
        settings.kafka_bootstrap_servers,
        settings.topic(settings.finance_credits_group),
        settings.model_call_completed_topic,
    )
    if not committed:  # the group never consumed this topic: nothing tells lag from loss
        return diffs, []
    kept: list[Difference] = []
    pending: list[Difference] = []
    ids = {id(d) for d in candidates}
    for d in diffs:
        # A candidate has an event, so a partition and an offset; the checks say so to the type checker.
        if (
            id(d) in ids
            and d.partition is not None
            and d.offset is not None
            and d.offset >= committed.get(d.partition, 0)
        ):
            d.kind = Kind.NOT_YET_DECIDED
            pending.append(d)
        else:
            kept.append(d)
    return kept, pending


async def repair(
    settings: FinanceSettings,
    window: Window,
    *,
    apply: bool = False,
    progress: Progress | None = None,
    book: PriceBook | None = None,
) -> RepairResult:
    """The corrections that bring the window's ledger to what its events owe; written only with
    `apply`. Idempotent: ids are deterministic and a rerun finds nothing left to correct."""
    report = await reconcile(settings, window, progress, book)
    corrections: list[Correction] = []
    not_repaired: list[Difference] = []
    for d in report.differences:
        c = correction_for(d)
        if c is None:
            not_repaired.append(d)
        else:
            corrections.append(c)
    written = released = 0
    # Only holds of decided events: an old hold's event may still come, and releasing its hold would
    # let the user spend what that event will debit (DESIGN "The call lifecycle").
    leaking = [h["event_id"] for h in report.decided_holds]
    if apply and (corrections or leaking):
        conn = await connect(settings)
        try:
            if corrections:
                written = await ledger.write_corrections(conn, corrections)
            released = await hold_store.release_holds(conn, leaking)  # released, never debited
        finally:
            await conn.close()
    return RepairResult(report, corrections, apply, written, not_repaired, released)


async def open_holds(settings: FinanceSettings, older_than_s: float) -> list[asyncpg.Record]:
    """Admission holds placed more than `older_than_s` ago (and any of an event already decided), oldest first."""
    conn = await connect(settings)
    try:
        holds = await hold_store.stale_holds(conn, older_than_s)
    finally:
        await conn.close()
    return sorted(holds["decided"] + holds["old"], key=lambda h: (h["placed_at"], h["event_id"]))
