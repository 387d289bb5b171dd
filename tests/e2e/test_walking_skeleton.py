"""The wiring end to end: an event published to the real broker becomes a ledger entry written by
the credit service running as its own process, and its outcome comes back on `credit_ledger`."""

import json
import time

import pytest
from aiokafka import AIOKafkaConsumer

from schemas.events import CreditOutcome, Decision, KeySource
from tests.support import make_event, publish, wait_for

pytestmark = pytest.mark.e2e


async def test_an_event_from_the_chat_side_becomes_one_ledger_entry_and_one_outcome(stack, credit_service):
    conn = await stack.connect()
    await conn.execute("INSERT INTO accounts (user_id) VALUES ('alice')")
    await conn.execute("INSERT INTO grants (grant_key, user_id, plan, credits) VALUES ('g', 'alice', 'free', 50)")
    platform = make_event(key_source=KeySource.PLATFORM, model="gpt-4o")
    byok = make_event(key_source=KeySource.BYOK, model="gpt-4o")
    await publish(stack.kafka_bootstrap, stack.settings().model_call_completed_topic, [platform, byok])

    await wait_for(lambda: _count(conn), what="both decisions")
    rows = {r["event_id"]: (r["decision"], r["credits"]) for r in await conn.fetch("SELECT * FROM ledger_entries")}
    assert rows == {platform.event_id: ("debited", 5), byok.event_id: ("not_billed_byok", 0)}
    assert await conn.fetchval("SELECT balance FROM accounts WHERE user_id = 'alice'") == 45
    await conn.close()

    consumer = AIOKafkaConsumer(
        stack.settings().credit_ledger_topic,
        bootstrap_servers=stack.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        outcomes = {}
        deadline = time.monotonic() + 30
        while len(outcomes) < 2:  # fails, never hangs, when an outcome is missing
            assert time.monotonic() < deadline, f"only {len(outcomes)} of 2 outcomes published within 30 s"
            for records in (await consumer.getmany(timeout_ms=1_000)).values():
                for r in records:
                    o = CreditOutcome.from_json(r.value)
                    outcomes[o.event_id] = o
    finally:
        await consumer.stop()
    assert outcomes[platform.event_id].decision is Decision.DEBITED
    assert outcomes[platform.event_id].balance_after == 45
    assert outcomes[byok.event_id].decision is Decision.NOT_BILLED_BYOK
    assert "sk-" not in json.dumps([o.model_dump(mode="json") for o in outcomes.values()])


async def _count(conn):
    return await conn.fetchval("SELECT count(*) FROM ledger_entries") == 2
