"""Composition root of the credit service: builds every part from one settings object."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer

from schemas.pricing import PriceBook, default_price_book
from services.credits.consumer import CreditConsumer, build_consumer, consumer_lag, track_lag
from services.credits.ledger import Ledger
from services.credits.relay import OutcomeRelay
from services.credits.service import CreditService
from services.credits.settings import CreditSettings
from services.shared.db import create_pool, migrate
from services.shared.gc_tuning import tune_for_batches
from services.shared.kafka import make_producer
from services.shared.logging import setup_logging

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
    consumer: CreditConsumer
    book: PriceBook

    async def lag(self) -> int | None:
        return await consumer_lag(self.consumer.subscriber)

    def api(self):
        # Imported here, not at the top: FastAPI takes about as long to import as everything the
        # consumer needs, and a restarted instance should be debiting before it serves HTTP.
        from services.credits.api import ApiContext, build_api

        return build_api(ApiContext(self.settings, self.ledger, self.book, self.producer,
                                    consumer_running=lambda: self.consumer.broker.running,
                                    stall=self.consumer.watch))


async def run_relay(settings: CreditSettings) -> None:
    """The outcome relay with its own pool and producer, until cancelled."""
    # Held for the relay's life: the LISTEN connection, and transactions whose advisory lock ends with
    # them; nothing changes session state, so connections go back to the pool without a reset query.
    pool = await create_pool(settings.database_url, settings.database_schema, max_size=2, reset_sessions=False)
    producer = await start_producer(settings)
    try:
        await OutcomeRelay(pool, producer, settings.credit_ledger_topic, batch=settings.relay_batch,
                           idle_poll_s=settings.relay_idle_poll_s).run()
    finally:
        await producer.stop()
        await pool.close()


def _die_with_parent(parent_pid: int) -> None:
    """Make the kernel end this process when its parent dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _relay_process_main(settings_json: str, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    settings = CreditSettings.model_validate_json(settings_json)
    setup_logging(settings.log_level, "credits-relay")
    tune_for_batches()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_relay(settings))


async def supervise_relay_process(settings: CreditSettings) -> None:
    """Keep one relay child process running; it is restarted if it dies, stopped on cancel."""
    ctx = multiprocessing.get_context("spawn")
    proc = None
    try:
        while True:
            if proc is None or not proc.is_alive():
                if proc is not None:
                    log.warning("outcome relay process exited with %s; restarting it", proc.exitcode)
                proc = ctx.Process(target=_relay_process_main, args=(settings.model_dump_json(), os.getpid()),
                                   name="credits-relay", daemon=True)
                proc.start()
            await asyncio.sleep(1)
    finally:
        if proc is not None and proc.is_alive():
            proc.terminate()
            await asyncio.to_thread(proc.join, 10)


async def expire_holds(ledger: Ledger, every_s: float) -> None:
    """Release holds past their expiry (their calls never reported back), until cancelled."""
    while True:
        try:
            released = await ledger.expire_holds()
            if released:
                log.warning("released %d admission holds past their expiry (their events never came)", released)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database away: try again next round
            log.debug("hold expiry skipped: %s", exc)
        await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def running(settings: CreditSettings, book: PriceBook | None = None,
                  ledger_factory: type[Ledger] = Ledger) -> AsyncIterator[CreditRuntime]:
    """The consumer, the outcome relay and the lag gauge, running until the block exits."""
    await migrate(settings.database_url, settings.database_schema)
    # Ledger transactions and reads only (no SET, LISTEN or session lock): no reset query per release.
    pool = await create_pool(settings.database_url, settings.database_schema, max_size=settings.db_pool_size,
                             reset_sessions=False)
    producer = await start_producer(settings)
    book = book or default_price_book()
    ledger = ledger_factory(pool)
    consumer = build_consumer(settings, CreditService(ledger, book))
    tune_for_batches()
    await consumer.start()
    background = [asyncio.create_task(track_lag(consumer.subscriber, watch=consumer.watch)),
                  asyncio.create_task(consumer.watch.run())]
    if settings.relay_mode == "process":
        background.append(asyncio.create_task(supervise_relay_process(settings)))
    elif settings.relay_mode == "task":
        background.append(asyncio.create_task(run_relay(settings)))
    background.append(asyncio.create_task(expire_holds(ledger, settings.hold_sweep_s)))
    try:
        yield CreditRuntime(settings, pool, producer, ledger, consumer, book)
    finally:
        await consumer.stop()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await producer.stop()
        await pool.close()
