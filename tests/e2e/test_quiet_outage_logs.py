"""Quiet logs (issue 21 item 6): a Kafka outage is one line per part when it starts and one when it
ends, not thousands of aiokafka ERROR lines per service; the chat's relay names the part that is
really away (PostgreSQL is not "Kafka")."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import asyncpg
import pytest

from infra.topics import ensure_topics, wait_for_broker
from schemas.topics import topic_specs
from services.chat.outbox import OutboxRelay
from services.shared.db import migrate
from services.shared.kafka import make_producer
from tests.e2e.test_chat_flow import start_system

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OUTAGE_S = 25
PER_SERVICE = 12  # a handful of parts per service (relay, consumer, aiokafka's first line of each kind)
LINE = re.compile(r"^\S+ \S+ (\S+) (WARNING|ERROR|CRITICAL) (\S+): (.*)$")


def warnings_after(path, offset: int) -> list[tuple[str, str, str]]:
    """(service, logger, message) of each WARNING or worse line written after `offset`."""
    text = path.read_bytes()[offset:].decode(errors="replace")
    return [(m[1], m[3], m[4][:160]) for m in map(LINE.match, text.splitlines()) if m]


async def test_a_kafka_outage_writes_a_few_lines_per_service_not_thousands(
    private_kafka, database_url, db_schema, tmp_path
):
    admin = await wait_for_broker(private_kafka.bootstrap, 60)
    await ensure_topics(admin, topic_specs(partitions=3))
    await admin.close()
    logs = tmp_path / "logs"
    systems = start_system(private_kafka.bootstrap, database_url, db_schema, "", logs)
    system = next(systems)
    try:
        system.grant("kay", "standard")
        with system.client("kay") as chat:
            # Platform calls while up and during the outage: the relay has events to publish then.
            assert chat.post("/chat", json={"feature": "code_fix", "message": "fix"}).status_code == 200
            offsets = {p.name: p.stat().st_size for p in logs.glob("*.log")}
            private_kafka.stop()
            started = time.monotonic()
            for i in range(3):
                r = chat.post("/chat", json={"feature": "code_fix", "message": f"fix {i}"})
                assert r.status_code in (200, 503), r.text
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))
            private_kafka.start()
            balance_before = system.balance("kay")
            # Back: the events waiting in the outbox are published and billed.
            deadline = time.monotonic() + 60
            while system.balance("kay") == balance_before and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(5)
        lines = {name: warnings_after(logs / name, offset) for name, offset in offsets.items()}
        report = "\n".join(f"{n}: {len(v)} lines\n  " + "\n  ".join(map(str, v)) for n, v in lines.items())
        print(report)
        assert all(len(found) <= PER_SERVICE for found in lines.values()), report
        chat_lines = [m for _, logger, m in lines["chat.log"] if logger == "services.chat.outbox"]
        assert sum("cannot reach Kafka" in m for m in chat_lines) == 1, report
        assert sum("reaches Kafka again" in m for m in chat_lines) == 1, report
        assert not any("PostgreSQL" in m for m in chat_lines), report
    finally:
        systems.close()


async def test_the_chat_relay_says_postgresql_when_postgresql_is_away(private_postgres, kafka_bootstrap):
    await migrate(private_postgres.url)
    pool = await asyncpg.create_pool(private_postgres.url, min_size=1, max_size=2)
    relay = OutboxRelay(pool, lambda: make_producer(kafka_bootstrap), "unused", idle_poll_s=0.1)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger("services.chat.outbox").addHandler(handler)
    try:
        await relay.start()
        await asyncio.sleep(1)
        await asyncio.to_thread(private_postgres.stop)
        await asyncio.sleep(8)
        await asyncio.to_thread(private_postgres.start)
        await asyncio.sleep(8)
    finally:
        await relay.stop()
        logging.getLogger("services.chat.outbox").removeHandler(handler)
        await pool.close()
    print(records)
    assert not any("Kafka" in r for r in records), records
    assert sum("cannot reach PostgreSQL" in r for r in records) == 1, records
    assert sum("reaches PostgreSQL again" in r for r in records) == 1, records
