"""The outcome relay's own process: what the child imports is only what the relay needs.

A spawned child imports its parent's main module and the module of its target before it runs a line
of it; kept light (no FastStream, no FastAPI), the child starts in half the time, and it asks the
kernel to end it with its parent before importing anything heavy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal

from aiokafka import AIOKafkaProducer

from services.credits.relay import OutcomeRelay
from services.credits.settings import CreditSettings
from services.shared import event_loop
from services.shared.db import create_pool
from services.shared.gc_tuning import tune_for_batches
from services.shared.kafka import OutageLog, make_producer
from services.shared.logging import setup_logging

log = logging.getLogger("services.credits")


async def start_producer(settings: CreditSettings) -> AIOKafkaProducer:
    """Start the producer, waiting for the broker if it is not up yet (one line when it is not, one
    when it answers: a relay restarted during an outage does not write a line per second)."""
    outage = OutageLog(log, "outcome relay")
    while True:
        producer = make_producer(settings.kafka_bootstrap_servers, linger_ms=5)
        try:
            await producer.start()
            outage.up()
            return producer
        except Exception as exc:
            await producer.stop()
            outage.down("Kafka", exc)
            await asyncio.sleep(1)


async def run_relay(settings: CreditSettings) -> None:
    """The outcome relay with its own pool and producer, until cancelled."""
    # Held for the relay's life: the LISTEN connection, and transactions whose advisory lock ends with
    # them; nothing changes session state, so connections go back to the pool without a reset query.
    pool = await create_pool(settings.database_url, settings.database_schema, max_size=2, reset_sessions=False)
    producer = await start_producer(settings)
    try:
        await OutcomeRelay(
            pool,
            producer,
            settings.credit_ledger_topic,
            batch=settings.relay_batch,
            idle_poll_s=settings.relay_idle_poll_s,
        ).run()
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
        event_loop.run(run_relay(settings))


async def supervise_relay_process(settings: CreditSettings) -> None:
    """Keep one relay child process running; it is restarted if it dies, stopped on cancel."""
    ctx = multiprocessing.get_context("spawn")
    proc = None
    try:
        # A new interpreter importing everything takes a core for a second: after a (re)start the
        # consumer gets the machine first, and the outbox waits (bench/resume.py: ~0.8 s sooner debits).
        await asyncio.sleep(settings.relay_start_delay_s)
        while True:
            if proc is None or not proc.is_alive():
                if proc is not None:
                    log.warning("outcome relay process exited with %s; restarting it", proc.exitcode)
                proc = ctx.Process(
                    target=_relay_process_main,
                    args=(settings.model_dump_json(), os.getpid()),
                    name="credits-relay",
                    daemon=True,
                )
                proc.start()
            await asyncio.sleep(1)
    finally:
        if proc is not None and proc.is_alive():
            proc.terminate()
            await asyncio.to_thread(proc.join, 10)
