"""The replay use case: rebuild every balance from the whole log (plus the live grants) into a scratch
schema and compare it with the live balances."""

from __future__ import annotations

import time
from dataclasses import dataclass

from billing.pricing import PriceBook, default_price_book
from services.finance import scratch as scratch_store
from services.finance.assessment import Assessor, Tally, Unreadable
from services.finance.loading import connect, load_events
from services.finance.progress import NoProgress, Progress
from services.finance.scratch import BalanceDifference
from services.finance.settings import FinanceSettings
from services.shared.db import migrate


@dataclass
class ReplayResult:
    topic: str
    live_schema: str
    scratch_schema: str
    tally: Tally
    entries: int
    accounts: int
    differences: list[BalanceDifference]
    unreadable: list[Unreadable]
    elapsed_s: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.differences


class ReplayRefused(RuntimeError):
    """The scratch schema is the live one, or already holds a ledger and `replace` was not asked."""


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
    scratch = scratch_store.check_schema_name(scratch)
    conn = await connect(settings)
    try:
        live = settings.database_schema or await conn.fetchval("SELECT current_schema()")
        if scratch in (live, "public"):
            raise ReplayRefused(f"refusing to replay into {scratch!r}: it is the live ledger's schema")
        if not await scratch_store.scratch_is_empty(conn, scratch):
            if not replace:
                raise ReplayRefused(f"schema {scratch!r} already holds a ledger; pass --replace to rebuild it")
            await conn.execute(f"DROP SCHEMA {scratch_store.ident(scratch)} CASCADE")
    finally:
        await conn.close()
    await migrate(settings.database_url, scratch)
    # The ledger's triggers name their tables unqualified, so the rebuild must run with the scratch
    # schema first on the search path: otherwise its sums would land on the live accounts.
    conn = await connect(settings, scratch)
    try:
        assessor = Assessor(book or default_price_book())
        tally, unreadable, _ = await load_events(settings, conn, assessor, None, None, progress)
        entries = await scratch_store.build_replay(conn, live, scratch, assessor.shapes.shapes)
        accounts, diffs = await scratch_store.compare_balances(conn, live, scratch)
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
