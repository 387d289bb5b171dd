"""Reading a range of the log into PostgreSQL: each record assessed, the events COPied into the
session's temporary events table while the next batch is read (Kafka, Python and PostgreSQL overlap).
"""

from __future__ import annotations

import asyncio

import asyncpg

from services.finance import ledger
from services.finance.assessment import Assessor, EventRow, Tally, Unreadable
from services.finance.event_log import EventLog
from services.finance.progress import Progress
from services.finance.settings import FinanceSettings
from services.shared.db import server_settings


async def connect(settings: FinanceSettings, schema: str | None = None) -> asyncpg.Connection:
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
    tally, unreadable = Tally(), list[Unreadable]()
    queue: asyncio.Queue[list[EventRow] | None] = asyncio.Queue(maxsize=4)

    async def writer() -> None:
        while (rows := await queue.get()) is not None:
            await ledger.copy_events(conn, rows)

    async def put(rows: list[EventRow] | None) -> None:
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
            buffer: list[EventRow] = []
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
