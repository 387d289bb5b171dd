"""End to end: events go through the real credit service (its own process, real broker, real
database); finance then reconciles the window to zero and replays the same balances."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from schemas.events import CallStatus, Feature, KeySource, Provider
from services.finance.reconciliation import reconcile
from services.finance.replay import replay
from services.finance.settings import FinanceSettings
from services.finance.window import Window
from tests.support import make_event, publish, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
async def scratch(database_url):
    name = "finance_e2e_" + uuid.uuid4().hex[:8]
    yield name
    conn = await asyncpg.connect(database_url)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    await conn.close()


async def test_a_ledger_written_by_the_credit_service_reconciles_to_zero(stack, credit_service, scratch):
    began = datetime.now(timezone.utc)
    shapes = [
        dict(),
        dict(key_source=KeySource.BYOK),
        dict(key_source=KeySource.BYOK, feature=Feature.DEEP_ANALYSIS),
        dict(feature=Feature.CODE_FIX),
        dict(status=CallStatus.FAILED),
        dict(model="o1"),
        dict(model="claude-3-5-haiku", provider=Provider.ANTHROPIC),
        dict(model="not-a-priced-model"),
        dict(key_source=KeySource.BYOK, feature=Feature.CODE_CANVAS),
    ]
    events = [make_event(user_id=f"user{i % 4}", **shapes[i % len(shapes)]) for i in range(60)]
    topic = stack.settings().model_call_completed_topic
    await publish(stack.kafka_bootstrap, topic, events + events[:10])  # with redeliveries

    conn = await stack.connect()
    try:
        await wait_for(lambda: _decided(conn, len(events)), timeout_s=60, what="every event decided")
        debited = await conn.fetchval("SELECT sum(credits) FROM ledger_entries WHERE decision = 'debited'")
    finally:
        await conn.close()
    assert debited > 0

    settings = stack.settings(FinanceSettings)
    window = Window(began - timedelta(minutes=1), datetime.now(timezone.utc) + timedelta(minutes=1))
    report = await reconcile(settings, window)
    assert report.differences == []
    assert report.tally.in_window == 70 and report.duplicate_deliveries == 10
    assert report.ledger_entries == 60

    result = await replay(settings, scratch)
    assert result.clean and result.entries == 60


async def _decided(conn, n: int) -> bool:
    return await conn.fetchval("SELECT count(*) FROM ledger_entries WHERE kind = 'decision'") >= n
