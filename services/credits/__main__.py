"""`python -m services.credits`: the consumer, the outcome relay and the HTTP API in one process."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from schemas.pricing import default_price_book
from services.credits.api import ApiContext, build_api
from services.credits.consumer import build_broker, track_lag
from services.credits.ledger import Ledger
from services.credits.relay import OutcomeRelay
from services.credits.service import CreditService
from services.credits.settings import CreditSettings
from services.shared.db import create_pool, migrate
from services.shared.kafka import make_producer
from services.shared.logging import setup_logging

log = logging.getLogger("services.credits")


async def start_producer(settings: CreditSettings):
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


async def serve(settings: CreditSettings) -> None:
    await migrate(settings.database_url, settings.database_schema)
    pool = await create_pool(settings.database_url, settings.database_schema, max_size=settings.db_pool_size)
    producer = await start_producer(settings)
    book = default_price_book()
    ledger = Ledger(pool)
    relay = OutcomeRelay(pool, producer, settings.credit_ledger_topic,
                         batch=settings.relay_batch, idle_poll_s=settings.relay_idle_poll_s)
    service = CreditService(ledger, book, on_committed=relay.wake)
    broker = build_broker(settings, service)
    await broker.start()
    api = build_api(ApiContext(settings, ledger, book, producer, consumer_running=lambda: broker.running))
    server = uvicorn.Server(uvicorn.Config(api, host=settings.http_host, port=settings.http_port,
                                           log_level="warning", access_log=False))
    background = [asyncio.create_task(relay.run()), asyncio.create_task(track_lag(broker))]
    log.info("credit service up: consuming %s, API on %s:%d",
             settings.model_call_completed_topic, settings.http_host, settings.http_port)
    try:
        await server.serve()  # returns on SIGINT/SIGTERM
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await broker.stop()
        await producer.stop()
        await pool.close()
        log.info("credit service stopped")


def main() -> None:
    settings = CreditSettings()
    setup_logging(settings.log_level, "credits")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
