"""Composition root of the credit service: builds every part from one settings object."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer

from schemas.pricing import PriceBook, default_price_book
from services.credits.api import ApiContext, build_api
from services.credits.consumer import CreditConsumer, build_consumer, consumer_lag, track_lag
from services.credits.ledger import Ledger
from services.credits.relay import OutcomeRelay
from services.credits.service import CreditService
from services.credits.settings import CreditSettings
from services.shared.db import create_pool, migrate
from services.shared.kafka import make_producer

log = logging.getLogger("services.credits")


async def start_producer(settings: CreditSettings) -> AIOKafkaProducer:
    """Start the producer, waiting for the broker if it is not up yet."""
    while True:
        producer = make_producer(settings.kafka_bootstrap_servers, linger_ms=5)
        try:
            await producer.start()
            return producer
        except Exception as exc:
            await producer.stop()
            log.warning("Kafka not reachable yet (%s); retrying", exc)
            await asyncio.sleep(1)


@dataclass
class CreditRuntime:
    settings: CreditSettings
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    ledger: Ledger
    relay: OutcomeRelay
    consumer: CreditConsumer
    book: PriceBook

    async def lag(self) -> int | None:
        return await consumer_lag(self.consumer.subscriber)

    def api(self):
        return build_api(ApiContext(self.settings, self.ledger, self.book, self.producer,
                                    consumer_running=lambda: self.consumer.broker.running))


@contextlib.asynccontextmanager
async def running(settings: CreditSettings, book: PriceBook | None = None,
                  ledger_factory: type[Ledger] = Ledger) -> AsyncIterator[CreditRuntime]:
    """The consumer, the outcome relay and the lag gauge, running until the block exits."""
    await migrate(settings.database_url, settings.database_schema)
    pool = await create_pool(settings.database_url, settings.database_schema, max_size=settings.db_pool_size)
    producer = await start_producer(settings)
    book = book or default_price_book()
    ledger = ledger_factory(pool)
    relay = OutcomeRelay(pool, producer, settings.credit_ledger_topic,
                         batch=settings.relay_batch, idle_poll_s=settings.relay_idle_poll_s)
    consumer = build_consumer(settings, CreditService(ledger, book, on_committed=relay.wake))
    await consumer.start()
    background = [asyncio.create_task(relay.run()), asyncio.create_task(track_lag(consumer.subscriber))]
    try:
        yield CreditRuntime(settings, pool, producer, ledger, relay, consumer, book)
    finally:
        await consumer.stop()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await producer.stop()
        await pool.close()
