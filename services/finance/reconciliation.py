"""The use cases: reconcile a window, repair it, replay the whole log into a scratch schema.

Each takes the typed settings and an optional progress port, builds its clients at start and closes
them at the end; the CLI only translates arguments into these calls.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol
from uuid import UUID

import asyncpg

from billing.pricing import PriceBook, default_price_book
from services.finance import ledger
from services.finance.assessment import Assessor, Tally, Unreadable
from services.finance.conflicts import Conflict, read_conflicts
from services.finance.differences import Correction, Difference, Kind, correction_for
from services.finance.event_log import EventLog, committed_offsets
from services.finance.settings import FinanceSettings
from services.finance.window import Window
from services.shared.db import migrate, server_settings


class Progress(Protocol):
    """Where long reads report how far they are (a rich progress bar in the CLI)."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int) -> None: ...


class NoProgress:
    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


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
    old_holds: list = field(default_factory=list)
    decided_holds: list = field(default_factory=list)
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


@dataclass
class ReplayResult:
    topic: str
    live_schema: str
    scratch_schema: str
    tally: Tally
    entries: int
    accounts: int
    differences: list[ledger.BalanceDifference]
    unreadable: list[Unreadable]
    elapsed_s: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.differences


async def _connect(settings: FinanceSettings, schema: str | None = None) -> asyncpg.Connection:
    return await asyncpg.connect(
        settings.database_url,
        server_settings=server_settings(schema or settings.database_schema) | ledger.SESSION_SETTINGS,
    )


async def load_events(
    settings: FinanceSettings,
    conn: asyncpg.Connection,
    assessor: Assessor,
    from_ms: int | None,
    to_ms: int | None,
    progress: Progress,
) -> tuple[Tally, list[Unreadable], int]:
    """Read the log range, assess each record and COPY the events into the temporary table while
    the next batch is read (Kafka, Python and PostgreSQL work overlap)."""
    await ledger.create_events_table(conn)
    tally, unreadable = Tally(), []
    queue: asyncio.Queue[list[tuple] | None] = asyncio.Queue(maxsize=4)

    async def writer() -> None:
        while (rows := await queue.get()) is not None:
            await ledger.copy_events(conn, rows)

    async def put(rows: list[tuple] | None) -> None:
        # Wait for room in the queue or for the writer to fail, whichever comes first, so a failed
        # COPY surfaces as its own error instead of a reader waiting forever on a full queue.
        putting = asyncio.ensure_future(queue.put(rows))
        await asyncio.wait({putting, task}, return_when=asyncio.FIRST_COMPLETED)
        if not putting.done():
            putting.cancel()
            task.result()
            raise RuntimeError("the events writer stopped early")

    task = asyncio.create_task(writer())
    try:
        async with EventLog(
            settings.kafka_bootstrap_servers,
            settings.model_call_completed_topic,
            fetch_records=settings.finance_fetch_records,
            stall_timeout_s=settings.finance_stall_timeout_s,
        ) as log:
            ranges = await log.plan(from_ms, to_ms)
            planned = sum(r.size for r in ranges)
            progress.start(planned, f"reading {settings.model_call_completed_topic}")
            buffer: list[tuple] = []
            async for records in log.read(ranges):
                rows, bad, t = assessor.assess(records)
                tally.add(t)
                unreadable += bad
                buffer += rows
                if len(buffer) >= settings.finance_copy_rows:
                    await put(buffer)
                    buffer = []
                progress.advance(len(records))
            await put(buffer)
        await put(None)
        await task
    finally:
        if not task.done():
            task.cancel()
    return tally, unreadable, planned


def _unreadable_differences(
    unreadable: list[Unreadable], ledger_only: dict[UUID, list[Difference]]
) -> list[Difference]:
    """One difference per unreadable record, carrying the ledger entries held under its id, if any."""
    out = []
    for u in unreadable:
        held = ledger_only.pop(u.event_id, []) if u.event_id else []
        out.append(
            Difference(
                kind=Kind.UNREADABLE_EVENT,
                event_id=u.event_id,
                user_id=",".join(sorted({h.user_id for h in held})) or None,
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
    conn = await _connect(settings)
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
        ledger_only = {}
        kept = []
        for d in diffs:
            if d.expected_decision is None and d.event_id in unreadable_ids:
                ledger_only.setdefault(d.event_id, []).append(d)
            else:
                kept.append(d)
        kept += _unreadable_differences(unreadable, ledger_only)
        kept, pending = await _set_apart_undecided(settings, kept)
        entries = await ledger.ledger_entry_count(conn, window)
        holds = await ledger.stale_holds(conn, settings.finance_hold_age_s)
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


async def _set_apart_undecided(settings: FinanceSettings, diffs: list[Difference]) -> tuple[list, list]:
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
    kept, pending = [], []
    ids = {id(d) for d in candidates}
    for d in diffs:
        if id(d) in ids and d.offset >= committed.get(d.partition, 0):
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
    corrections, not_repaired = [], []
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
        conn = await _connect(settings)
        try:
            if corrections:
                written = await ledger.write_corrections(conn, corrections)
            released = await ledger.release_holds(conn, leaking)  # released, never debited
        finally:
            await conn.close()
    return RepairResult(report, corrections, apply, written, not_repaired, released)


async def open_holds(settings: FinanceSettings, older_than_s: float) -> list[asyncpg.Record]:
    """Admission holds placed more than `older_than_s` ago (and any of an event already decided), oldest first."""
    conn = await _connect(settings)
    try:
        holds = await ledger.stale_holds(conn, older_than_s)
    finally:
        await conn.close()
    return sorted(holds["decided"] + holds["old"], key=lambda h: (h["placed_at"], h["event_id"]))


class ReplayRefused(RuntimeError):
    pass


async def replay(
    settings: FinanceSettings,
    scratch: str,
    *,
    replace: bool = False,
    progress: Progress | None = None,
    book: PriceBook | None = None,
) -> ReplayResult:
    """Rebuild every balance from the whole log (plus the live grants) into `scratch` and compare
    them with the live balances."""
    began = time.perf_counter()
    progress = progress or NoProgress()
    scratch = ledger.check_schema_name(scratch)
    conn = await _connect(settings)
    try:
        live = settings.database_schema or await conn.fetchval("SELECT current_schema()")
        if scratch in (live, "public"):
            raise ReplayRefused(f"refusing to replay into {scratch!r}: it is the live ledger's schema")
        if not await ledger.scratch_is_empty(conn, scratch):
            if not replace:
                raise ReplayRefused(f"schema {scratch!r} already holds a ledger; pass --replace to rebuild it")
            await conn.execute(f"DROP SCHEMA {ledger.ident(scratch)} CASCADE")
    finally:
        await conn.close()
    await migrate(settings.database_url, scratch)
    # The ledger's triggers name their tables unqualified, so the rebuild must run with the scratch
    # schema first on the search path: otherwise its sums would land on the live accounts.
    conn = await _connect(settings, scratch)
    try:
        assessor = Assessor(book or default_price_book())
        tally, unreadable, _ = await load_events(settings, conn, assessor, None, None, progress)
        entries = await ledger.build_replay(conn, live, scratch, assessor.shapes.shapes)
        accounts, diffs = await ledger.compare_balances(conn, live, scratch)
    finally:
        await conn.close()
    return ReplayResult(
        settings.model_call_completed_topic,
        live,
        scratch,
        tally,
        entries,
        accounts,
        diffs,
        unreadable,
        time.perf_counter() - began,
    )
