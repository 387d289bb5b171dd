"""Composition root of the credit service: builds every part from one settings object."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from aiokafka import AIOKafkaProducer

from billing.pricing import PriceBook, default_price_book
from services.credits.consumer import CreditConsumer, build_consumer, consumer_lag, track_lag
from services.credits.ledger import Ledger
from services.credits.relay_process import run_relay, start_producer, supervise_relay_process
from services.credits.service import CreditService
from services.credits.settings import CreditSettings
from services.shared.db import create_pool, migrate
from services.shared.gc_tuning import tune_for_batches
from services.shared.sessions import SessionRevocations

if TYPE_CHECKING:
    from starlette.types import ASGIApp

log = logging.getLogger("services.credits")


@dataclass
class CreditRuntime:
    settings: CreditSettings
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    ledger: Ledger
    consumer: CreditConsumer
    book: PriceBook
    sessions: SessionRevocations

    async def lag(self) -> int | None:
        return await consumer_lag(self.consumer.subscriber)

    def api(self) -> ASGIApp:
        # Imported here, not at the top: FastAPI takes about as long to import as everything the
        # consumer needs, and a restarted instance should be debiting before it serves HTTP.
        from services.credits.api import ApiContext, build_api

        return build_api(
            ApiContext(
                self.settings,
                self.ledger,
                self.book,
                consumer_running=lambda: self.consumer.broker.running,
                stall=self.consumer.watch,
                sessions=self.sessions,
            )
        )


@contextlib.asynccontextmanager
async def running(
    settings: CreditSettings, book: PriceBook | None = None, ledger_factory: type[Ledger] = Ledger
) -> AsyncIterator[CreditRuntime]:
    """The consumer, the outcome relay and the lag gauge, running until the block exits."""
    await migrate(settings.database_url, settings.database_schema)
    # Ledger transactions and reads only (no SET, LISTEN or session lock): no reset query per release.
    pool = await create_pool(
        settings.database_url, settings.database_schema, max_size=settings.db_pool_size, reset_sessions=False
    )
    producer = await start_producer(settings)
    book = book or default_price_book()
    ledger = ledger_factory(pool)
    consumer = build_consumer(settings, CreditService(ledger, book))
    sessions = SessionRevocations(pool)
    await sessions.start()
    tune_for_batches()
    await consumer.start()
    background = [
        asyncio.create_task(track_lag(consumer.subscriber, watch=consumer.watch)),
        asyncio.create_task(consumer.watch.run()),
    ]
    if settings.relay_mode == "process":
        background.append(asyncio.create_task(supervise_relay_process(settings)))
    elif settings.relay_mode == "task":
        background.append(asyncio.create_task(run_relay(settings)))
    try:
        yield CreditRuntime(settings, pool, producer, ledger, consumer, book, sessions)
    finally:
        await consumer.stop()
        await sessions.stop()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await producer.stop()
        await pool.close()
