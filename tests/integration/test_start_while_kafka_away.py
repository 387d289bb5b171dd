"""A service (re)started while Kafka is away waits for it with one log line, not one a second: the CI
saw a credit relay child restarted during an outage write 30 lines in 25 s."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.credits.relay_process import start_producer
from services.credits.settings import CreditSettings
from services.validation.__main__ import start_worker
from services.validation.bootstrap import build
from services.validation.settings import ValidationSettings
from tests.support import free_port

pytestmark = pytest.mark.integration

WAIT_S = 4.5  # the loops retry each second: four or five tries


async def wait_a_while(start) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(start, WAIT_S)


def own_lines(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


async def test_the_outcome_relay_waiting_for_kafka_says_so_once(caplog):
    caplog.set_level(logging.INFO)
    await wait_a_while(start_producer(CreditSettings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")))
    lines = own_lines(caplog, "services.credits")
    assert len(lines) == 1, lines
    assert "outcome relay cannot reach Kafka" in lines[0]


async def test_the_validation_worker_waiting_for_kafka_says_so_once(caplog):
    caplog.set_level(logging.INFO)
    validation = build(ValidationSettings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}"))
    try:
        await wait_a_while(start_worker(validation))
    finally:
        await validation.stop()
    lines = own_lines(caplog, "services.validation")
    assert len(lines) == 1, lines
    assert "validation worker cannot reach Kafka" in lines[0]
