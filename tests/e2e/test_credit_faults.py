"""Exactly-once under faults, with the credit service as a real process on a real broker and database:
SIGKILL at random points under load, a PostgreSQL restart, a Kafka broker restart."""

import asyncio
import random
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from infra.harness import ServiceProcess
from infra.topics import ensure_topics, wait_for_broker
from schemas.events import KeySource
from schemas.topics import topic_specs
from services.shared.db import migrate
from tests.support import make_event, processes_with_env, publish, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODELS = [
    ("gpt-4o", KeySource.PLATFORM, 5),
    ("claude-3-5-haiku", KeySource.PLATFORM, 1),
    ("o1", KeySource.PLATFORM, 20),
    ("gpt-4o", KeySource.BYOK, 0),
]


def workload(n: int, users: int = 50):
    events, expected = [], Counter()
    for i in range(n):
        model, source, price = MODELS[i % len(MODELS)]
        e = make_event(user_id=f"user-{i % users}", model=model, key_source=source)
        events.append(e)
        expected[e.user_id] += price
    return events, expected


def credit_process(env: dict, log_path: Path) -> ServiceProcess:
    return ServiceProcess(log_path.stem, "services.credits", {**env, "BATCH_MAX_RECORDS": "500"}, log_path.parent)


async def ledger_state(url: str, schema: str):
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        count = await conn.fetchval("SELECT count(*) FROM ledger_entries")
        debited = Counter(
            {
                r["user_id"]: r["debited"]
                for r in await conn.fetch("SELECT user_id, debited FROM accounts")
                if r["debited"]
            }
        )
        # The sums the triggers keep must equal the entries themselves.
        recomputed = Counter(
            {
                r["user_id"]: r["s"]
                for r in await conn.fetch("SELECT user_id, sum(credits) AS s FROM ledger_entries GROUP BY user_id")
                if r["s"]
            }
        )
        return count, debited, recomputed
    finally:
        await conn.close()


async def assert_exact(url, schema, events, expected):
    async def done():
        return (await ledger_state(url, schema))[0] >= len(events)

    await wait_for(done, timeout_s=120, every_s=0.5, what=f"{len(events)} ledger entries")
    await asyncio.sleep(1.0)  # a late duplicate batch would show up now
    count, debited, recomputed = await ledger_state(url, schema)
    assert count == len(events), "no event lost, none decided twice"
    assert debited == expected, "no debit lost or doubled"
    assert recomputed == expected


async def test_sigkill_at_random_points_under_load_loses_and_doubles_nothing(stack, tmp_path):
    events, expected = workload(10_000)
    topic = stack.settings().model_call_completed_topic
    rng = random.Random(20261127)
    kills = 0
    decided_at_kill = []
    kills_under_load = 0

    async def feed():
        # About a minute of traffic: longer than twelve restarts take on a quick machine, so most kills
        # land while events are still arriving.
        for i in range(0, len(events), 200):
            await publish(stack.kafka_bootstrap, topic, events[i : i + 200])
            await asyncio.sleep(rng.uniform(0.6, 1.6))

    async def progressed_past(n):
        decided = (await ledger_state(stack.database_url, stack.database_schema))[0]
        return decided > n or (feeder.done() and decided == len(events))  # nothing left to make progress on

    feeder = asyncio.create_task(feed())
    # The same static member id on every restart: the new process takes the partitions back at once.
    proc = credit_process(stack.env() | {"CONSUMER_INSTANCE_ID": "credits-0"}, tmp_path / "credits.log")
    try:
        while kills < 12:
            before = decided_at_kill[-1] if decided_at_kill else 0
            proc.launch()
            if kills % 3 != 2:  # most kills land once work is flowing; some during start-up
                await wait_for(
                    lambda before=before: progressed_past(before), timeout_s=60, every_s=0.05, what="progress"
                )
            await asyncio.sleep(rng.uniform(0.0, 0.4))
            proc.kill()
            kills += 1
            decided_at_kill.append((await ledger_state(stack.database_url, stack.database_schema))[0])
            kills_under_load += not feeder.done()
        await feeder
        proc.launch()
        await assert_exact(stack.database_url, stack.database_schema, events, expected)
    finally:
        proc.stop()
        feeder.cancel()
    await asyncio.sleep(0.5)
    assert processes_with_env("TOPIC_PREFIX", stack.topic_prefix) == set(), "no relay child outlives its killed parent"
    assert kills >= 10
    lives_with_progress = sum(b > a for a, b in zip([0] + decided_at_kill, decided_at_kill, strict=False))
    assert lives_with_progress >= 5, f"kills must land while work is going on: {decided_at_kill}"
    assert kills_under_load >= 8, f"only {kills_under_load} kills landed while events were still arriving"


async def test_a_postgresql_restart_mid_load_loses_and_doubles_nothing(
    kafka_bootstrap, kafka_topics, private_postgres, tmp_path
):
    schema = "faults"
    await migrate(private_postgres.url, schema)
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TOPIC_PREFIX": kafka_topics,
        "DATABASE_URL": private_postgres.url,
        "DATABASE_SCHEMA": schema,
    }
    topic = kafka_topics + "model_call_completed"
    events, expected = workload(3000)
    proc = credit_process(env, tmp_path / "credits.log").launch()
    try:
        await proc.wait_healthy()
        await publish(kafka_bootstrap, topic, events[:1000])
        await asyncio.sleep(0.5)
        private_postgres.stop()
        await publish(kafka_bootstrap, topic, events[1000:2000])  # consumed while the database is down
        await asyncio.sleep(2)
        private_postgres.start()
        await publish(kafka_bootstrap, topic, events[2000:])
        await assert_exact(private_postgres.url, schema, events, expected)
        assert proc.proc.poll() is None, "the service survived the database restart"
    finally:
        proc.stop()


async def test_a_kafka_broker_restart_mid_load_loses_and_doubles_nothing(
    database_url, db_schema, private_kafka, tmp_path
):
    admin = await wait_for_broker(private_kafka.bootstrap, 60)
    await ensure_topics(admin, topic_specs(partitions=3))
    await admin.close()
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": private_kafka.bootstrap,
        "TOPIC_PREFIX": "",
        "DATABASE_URL": database_url,
        "DATABASE_SCHEMA": db_schema,
    }
    events, expected = workload(3000)
    proc = credit_process(env, tmp_path / "credits.log").launch()
    try:
        await proc.wait_healthy()
        await publish(private_kafka.bootstrap, "model_call_completed", events[:1500])
        await asyncio.sleep(0.3)
        private_kafka.stop()
        await asyncio.sleep(1)
        private_kafka.start()
        await publish(private_kafka.bootstrap, "model_call_completed", events[1500:])
        await assert_exact(database_url, db_schema, events, expected)
        assert proc.proc.poll() is None, "the service survived the broker restart"
    finally:
        proc.stop()
