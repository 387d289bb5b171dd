"""The calls' store on the real PostgreSQL (migration 0015): one row per user and Idempotency-Key written
with its pending event, the outcome kept, the answer dropped after its time and the billing kept, and
the relay publishing a pending event only once its instance's lease has lapsed."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from schemas.events import CallStatus, Ending, Feature, KeySource, ModelCallCompleted, Provider, utc_now
from services.chat.call_store import Outcome, PgCallStore
from services.chat.outbox import _DUE
from services.shared.db import migrate

pytestmark = pytest.mark.integration


def pending(user: str, event_id: uuid.UUID) -> ModelCallCompleted:
    return ModelCallCompleted(
        event_id=event_id,
        occurred_at=utc_now(),
        user_id=user,
        session_id="s",
        request_id="r",
        provider=Provider.OPENAI,
        model="gpt-4o-mini",
        feature=Feature.CHAT,
        key_source=KeySource.PLATFORM,
        status=CallStatus.FAILED,
        input_tokens=0,
        output_tokens=0,
        latency_ms=0,
        ending=Ending.INTERRUPTED,
    )


@pytest.fixture
async def store(database_url: str, db_schema: str):
    await migrate(database_url, db_schema)
    pool = await asyncpg.create_pool(database_url, server_settings={"search_path": db_schema}, min_size=1, max_size=4)
    try:
        yield PgCallStore(pool)
    finally:
        await pool.close()


async def test_one_row_per_user_and_key_and_its_outcome_then_only_the_billing(store: PgCallStore):
    instance, event_id = uuid.uuid4(), uuid.uuid4()
    await store.renew_lease(instance, 30)
    handle = await store.claim("ann", "k1", "a" * 64, instance, False, pending("ann", event_id))
    assert handle is not None
    assert await store.claim("ann", "k1", "a" * 64, instance, False, pending("ann", uuid.uuid4())) is None
    running = await store.find("ann", "k1")
    assert running.outcome is None and running.instance_alive and running.event_id == event_id
    done = pending("ann", event_id).model_copy(update={"status": CallStatus.SUCCEEDED, "ending": Ending.COMPLETED})
    outcome = Outcome(200, {"reply": "the answer", "billing": {"charged": True, "credits": 3}})
    assert await store.finish(handle, done, outcome)
    assert (await store.find("ann", "k1")).outcome == outcome
    assert await store.purge(answer_kept_s=3600, call_kept_s=86_400) == (0, 0)
    assert await store.purge(answer_kept_s=0, call_kept_s=86_400) == (1, 0)
    kept = (await store.find("ann", "k1")).outcome
    assert kept.body["reply"] is None and kept.body["answer_dropped"] is True and kept.body["billing"]["credits"] == 3
    assert await store.purge(answer_kept_s=0, call_kept_s=0) == (0, 1)
    assert await store.find("ann", "k1") is None


async def test_a_pending_event_is_due_only_once_its_instance_is_gone(store: PgCallStore):
    alive, gone = uuid.uuid4(), uuid.uuid4()
    await store.renew_lease(alive, 30)
    await store.renew_lease(gone, 30)
    await store.claim("bo", "slow", "b" * 64, alive, False, pending("bo", uuid.uuid4()))
    dead = pending("bo", uuid.uuid4())
    await store.claim("bo", "orphan", "c" * 64, gone, True, dead)

    # Both instances alive: a slow call is never due, however old it is. (Each look is rolled back:
    # the relay runs the statement in a transaction that commits only once Kafka has the events.)
    await store.pool.execute("UPDATE chat_outbox SET created_at = now() - interval '1 hour'")
    async with store.pool.acquire() as conn:
        tr = conn.transaction()
        await tr.start()
        assert {r["event_id"] for r in await conn.fetch(_DUE, 1.0, 100)} == set()
        await tr.rollback()
    await store.end_lease(gone)  # the instance stops (or its lease lapses)
    async with store.pool.acquire() as conn:
        tr = conn.transaction()
        await tr.start()
        rows = await conn.fetch(_DUE, 1.0, 100)
        await tr.rollback()
    assert [(r["event_id"], r["ready"]) for r in rows] == [(dead.event_id, False)]
    assert ModelCallCompleted.from_json(bytes(rows[0]["payload"])).ending is Ending.INTERRUPTED
    assert (await store.find("bo", "orphan")).instance_alive is False
    assert (await store.find("bo", "slow")).instance_alive is True


async def test_ending_a_call_already_ended_answers_the_outcome_it_has(store: PgCallStore):
    """A write whose commit landed while its answer was lost is retried; by then the relay may have taken
    the event, so `finish` says False. The call keeps the outcome it was ended with, and `end` answers
    that one, so the user is told what is billed (not "interrupted, not charged")."""
    instance, event_id = uuid.uuid4(), uuid.uuid4()
    await store.renew_lease(instance, 30)
    handle = await store.claim("bea", "k", "b" * 64, instance, False, pending("bea", event_id))
    done = pending("bea", event_id).model_copy(update={"status": CallStatus.SUCCEEDED, "ending": Ending.COMPLETED})
    charged = Outcome(200, {"reply": "yes", "charged": True})
    assert await store.finish(handle, done, charged)
    lost = Outcome(503, {"error": "interrupted", "charged": False})
    assert await store.end(event_id, lost) == charged
    assert (await store.find("bea", "k")).outcome == charged
    other = uuid.uuid4()
    await store.claim("bea", "k2", "c" * 64, instance, False, pending("bea", other))
    assert await store.end(other, lost) == lost and (await store.find("bea", "k2")).outcome == lost


async def test_finish_ends_the_call_only_if_its_outbox_row_takes_the_event(store: PgCallStore):
    """One statement does both: an outbox row that is not the call's (relayed and deleted, or another
    event's) leaves the call running, and the call is ended only once."""
    instance, event_id = uuid.uuid4(), uuid.uuid4()
    await store.renew_lease(instance, 30)
    handle = await store.claim("cy", "k", "d" * 64, instance, False, pending("cy", event_id))
    stranger = pending("cy", uuid.uuid4()).model_copy(update={"status": CallStatus.SUCCEEDED})
    assert not await store.finish(handle, stranger, Outcome(200, {"reply": "not mine"}))
    assert (await store.find("cy", "k")).outcome is None
    done = pending("cy", event_id).model_copy(update={"status": CallStatus.SUCCEEDED, "ending": Ending.COMPLETED})
    first = Outcome(200, {"reply": "first"})
    assert await store.finish(handle, done, first)
    assert await store.finish(handle, done, Outcome(200, {"reply": "second"}))  # the row takes it again ...
    assert (await store.find("cy", "k")).outcome == first  # ... but the call ended once
    await store.pool.execute("DELETE FROM chat_outbox WHERE id = $1", handle)  # relayed
    assert not await store.finish(handle, done, Outcome(200, {"reply": "late"}))
