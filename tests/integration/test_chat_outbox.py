"""Events are never lost: calls made while Kafka is down, or by a process killed mid-call, still
reach `model_call_completed`, each exactly once. A broker of the test's own is stopped and started."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.harness import ServiceProcess
from schemas.events import Ending, ModelCallCompleted
from schemas.topics import MODEL_CALL_COMPLETED
from tests.e2e.test_chat_flow import start_system, use_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def read_all(bootstrap: str, topic: str) -> list[ModelCallCompleted]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(await producer.partitions_for(topic))]
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        events = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in partitions])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                events += [ModelCallCompleted.from_json(r.value) for r in records]
        return events
    finally:
        await consumer.stop()


def outbox_rows(url: str, schema: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(url, server_settings={"search_path": schema})
        try:
            return await conn.fetchval("SELECT count(*) FROM chat_outbox")
        finally:
            await conn.close()

    return asyncio.run(count())


def test_calls_made_while_kafka_is_down_reach_it_once_when_it_is_back(
    private_kafka, database_url, db_schema, tmp_path: Path
):
    for system in start_system(
        private_kafka.bootstrap, database_url, db_schema, "", tmp_path / "logs", with_validation=False
    ):
        system.grant("u1", "standard")  # 500
        client = system.client("u1")
        assert use_settings(client, "openai", "gpt-4o-mini").status_code == 200  # 3 credits a chat

        private_kafka.stop()
        ids = []
        for feature in ["chat"] * 5 + ["code_fix"]:
            r = client.post("/chat", json={"feature": feature, "message": "while Kafka is down"})
            assert r.status_code == 200, r.text
            ids.append(r.json()["event_id"])
        assert outbox_rows(database_url, db_schema) == 6  # held in PostgreSQL, not lost
        assert system.balance("u1") == 500  # nothing could be debited yet

        private_kafka.start()
        assert system.wait_balance("u1", 500 - 5 * 3 - 1, within_s=120) == 484
        events = asyncio.run(read_all(private_kafka.bootstrap, MODEL_CALL_COMPLETED))
        seen = Counter(str(e.event_id) for e in events)
        assert {i: seen[i] for i in ids} == {i: 1 for i in ids}
        assert sum(seen.values()) == 6
        assert all(e.user_id == "u1" and e.key_source.value == "platform" for e in events)
        assert outbox_rows(database_url, db_schema) == 0


def test_a_call_whose_process_dies_mid_call_is_published_as_failed_and_not_billed(
    private_kafka, database_url, db_schema, tmp_path: Path
):
    fast_stale = {"LEASE_S": "3", "LEASE_RENEW_S": "1"}
    for system in start_system(
        private_kafka.bootstrap, database_url, db_schema, "", tmp_path / "logs", with_validation=False, **fast_stale
    ):
        system.grant("u2", "standard")
        client = system.client("u2")
        assert use_settings(client, "anthropic", "claude-3-5-haiku").status_code == 200
        system.sim.state.register("sk-ant-local-simulator-valid-platform-0001", "slow", delay_ms=2500)
        import threading

        answered = []
        caller = threading.Thread(
            target=lambda client=client, answered=answered: answered.append(
                _post_ignoring_errors(client, "/chat", {"message": "slow one"})
            )
        )
        caller.start()
        deadline = time.monotonic() + 10
        while outbox_rows(database_url, db_schema) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outbox_rows(database_url, db_schema) == 1  # the call is recorded before the provider answers
        system.chat.kill()
        caller.join()
        assert answered == [None]  # the client never got an answer

        system.sim.state.register("sk-ant-local-simulator-valid-platform-0001", "valid")
        restarted = ServiceProcess(
            "chat2", "services.chat", {k: v for k, v in system.chat.env.items() if k != "HTTP_PORT"}, tmp_path / "logs"
        ).start()
        try:
            deadline = time.monotonic() + 60
            while outbox_rows(database_url, db_schema) and time.monotonic() < deadline:
                time.sleep(0.2)
            events = asyncio.run(read_all(private_kafka.bootstrap, MODEL_CALL_COMPLETED))
            assert [(e.user_id, e.status.value, e.model, e.ending) for e in events] == [
                ("u2", "failed", "claude-3-5-haiku", Ending.INTERRUPTED)
            ]
            assert system.wait_balance("u2", 500) == 500
        finally:
            restarted.stop()


def _post_ignoring_errors(client, path, body):
    try:
        return client.post(path, json=body).status_code
    except Exception:
        return None


def test_a_hold_outlives_a_kafka_outage_longer_than_the_old_hold_ttl_so_credits_are_spent_once(
    private_kafka, database_url, db_schema, tmp_path: Path
):
    """Kafka down for longer than holds used to live (HOLD_TTL_S): each expired hold let the same credits
    be spent again (three deep analyses on 50 credits, balance -100). A hold now lives until its event
    is decided, so the second and third are refused (402) all along and the balance ends at 0."""
    old_ttl = {"HOLD_TTL_S": "2", "HOLD_SWEEP_S": "0.5"}  # what lapsed holds before; ignored now
    for system in start_system(
        private_kafka.bootstrap,
        database_url,
        db_schema,
        "",
        tmp_path / "logs",
        with_validation=False,
        credits_env=old_ttl,
    ):
        system.grant("u3", "free")  # 50 credits: one deep analysis
        client = system.client("u3")
        private_kafka.stop()
        first = client.post("/chat", json={"feature": "deep_analysis", "message": "the first"})
        assert first.status_code == 200 and first.json()["billing"]["charged"] is True, first.text
        statuses = []
        for i in range(6):  # 9 s: several times the old TTL
            time.sleep(1.5)
            r = client.post("/chat", json={"feature": "deep_analysis", "message": f"again {i}"})
            statuses.append(r.status_code)
        assert statuses == [402] * 6, statuses
        assert outbox_rows(database_url, db_schema) == 1  # the first call's event waits for Kafka
        private_kafka.start()
        assert system.wait_balance("u3", 0, within_s=120) == 0
        time.sleep(2)
        assert system.balance("u3") == 0
        r = client.post("/chat", json={"feature": "deep_analysis", "message": "once more, now it is spent"})
        assert r.status_code == 402
