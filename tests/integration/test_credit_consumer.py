"""The credit consumer on the real broker and database: policy, idempotence, dead letters."""

import asyncio
import dataclasses
import json

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from schemas.events import CallStatus, CreditOutcome, Decision, Feature, KeySource, Provider
from schemas.topics import dlq
from services.credits.bootstrap import running
from services.credits.settings import CreditSettings
from services.shared.kafka import DeadLetter
from tests.support import make_event, publish, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def ledger(stack):
    """A Ledger on the stack's schema; its pool is `ledger.pool`."""
    from services.credits.ledger import Ledger

    pool = await asyncpg.create_pool(
        stack.database_url, min_size=1, max_size=2, server_settings={"search_path": stack.database_schema}
    )
    try:
        yield Ledger(pool)
    finally:
        await pool.close()


@pytest.fixture
async def credits(stack):
    async with running(stack.settings(CreditSettings)) as runtime:
        yield runtime


async def ledger_count(stack) -> int:
    conn = await stack.connect()
    try:
        return await conn.fetchval("SELECT count(*) FROM ledger_entries")
    finally:
        await conn.close()


async def read_all(bootstrap: str, topic: str, expected: int, timeout_ms: int = 15_000):
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    records = []
    try:
        while len(records) < expected:
            batch = await consumer.getmany(timeout_ms=timeout_ms)
            if not batch:
                break
            for rs in batch.values():
                records += rs
    finally:
        await consumer.stop()
    return records


async def test_every_delivery_three_times_gives_the_same_ledger_as_once(stack, credits):
    topic = stack.settings().model_call_completed_topic
    events = [
        make_event(user_id=f"u{i % 7}", model=m, key_source=ks, feature=f)
        for i, (m, ks, f) in enumerate(
            [
                ("gpt-4o", KeySource.PLATFORM, Feature.CHAT),
                ("o1", KeySource.PLATFORM, Feature.CHAT),
                ("gpt-4o", KeySource.BYOK, Feature.CHAT),
                ("gpt-4o", KeySource.BYOK, Feature.DEEP_ANALYSIS),
                ("claude-3-5-haiku", KeySource.BYOK, Feature.CODE_FIX),
            ]
            * 40
        )
    ]
    await publish(stack.kafka_bootstrap, topic, events * 3)
    await wait_for(lambda: _at_least(stack, len(events)), what="every event decided")
    conn = await stack.connect()
    try:
        # Let any straggling duplicate batches land before counting.
        await wait_for(lambda: _lag_zero(credits), what="consumer caught up")
        assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == len(events)
        expected = {}
        for e, price in zip(events, [5, 20, 0, 50, 1] * 40, strict=False):
            expected[e.user_id] = expected.get(e.user_id, 0) + price
        debited = dict(await conn.fetch("SELECT user_id, debited FROM accounts"))
        assert debited == expected
    finally:
        await conn.close()


async def _at_least(stack, n):
    return await ledger_count(stack) >= n


async def _lag_zero(runtime):
    return await runtime.lag() == 0


async def test_bad_input_goes_to_the_dlq_with_the_reason_and_the_consumer_keeps_going(stack, credits):
    topic = stack.settings().model_call_completed_topic
    good_before, good_after = make_event(), make_event()
    wrong_type = json.loads(make_event().to_json()) | {"input_tokens": "12"}
    negative = json.loads(make_event().to_json()) | {"output_tokens": -5}
    unknown_provider = json.loads(make_event().to_json()) | {"provider": "mistral"}
    unknown_feature = json.loads(make_event().to_json()) | {"feature": "summarise"}
    nul_user = json.loads(make_event().to_json()) | {"user_id": "al\u0000ice"}
    unpriced = make_event(model="gpt-9-ultra")
    huge = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    bad = [
        b'{"event_id": ',
        json.dumps(wrong_type).encode(),
        json.dumps(negative).encode(),
        json.dumps(unknown_provider).encode(),
        json.dumps(unknown_feature).encode(),
        huge,
        b"\xff\xfe",
        b"",
        json.dumps(nul_user).encode(),
    ]
    await publish(stack.kafka_bootstrap, topic, [good_before])
    await publish(stack.kafka_bootstrap, topic, bad, keys=[b"alice"] * len(bad))
    await publish(stack.kafka_bootstrap, topic, [unpriced, good_after])

    letters = await read_all(stack.kafka_bootstrap, dlq(topic), expected=len(bad) + 1)
    assert len(letters) == len(bad) + 1
    kinds = sorted(dict(r.headers)["dlq.error_type"].decode() for r in letters)
    assert kinds == sorted(
        [
            "malformed_json",
            "schema",
            "schema",
            "schema",
            "schema",
            "schema",
            "too_large",
            "malformed_json",
            "empty",
            "unpriced_model",
        ]
    )
    by_value = {r.value: dict(r.headers) for r in letters}
    assert b"input_tokens" in by_value[json.dumps(wrong_type).encode()][b"dlq.error".decode()]
    assert b"provider" in by_value[json.dumps(unknown_provider).encode()]["dlq.error"]
    assert huge in by_value, "the original bytes are kept"
    assert b"gpt-9-ultra" in by_value[unpriced.to_json()]["dlq.error"]
    assert all(h["dlq.source_topic"] == topic.encode() for h in by_value.values())

    conn = await stack.connect()
    try:
        rows = dict(await conn.fetch("SELECT event_id, decision FROM ledger_entries"))
        assert rows == {good_before.event_id: "debited", good_after.event_id: "debited", unpriced.event_id: "rejected"}
    finally:
        await conn.close()


async def test_an_outcome_is_published_for_every_decision(stack, credits):
    topic = stack.settings().model_call_completed_topic
    events = [
        make_event(user_id="bob"),
        make_event(user_id="bob", key_source=KeySource.BYOK),
        make_event(user_id="bob", status=CallStatus.FAILED),
        make_event(user_id="bob", model="nope"),
    ]
    await publish(stack.kafka_bootstrap, topic, events)
    records = await read_all(stack.kafka_bootstrap, stack.settings().credit_ledger_topic, expected=4)
    outcomes = {o.event_id: o for o in (CreditOutcome.from_json(r.value) for r in records)}
    assert [outcomes[e.event_id].decision for e in events] == [
        Decision.DEBITED,
        Decision.NOT_BILLED_BYOK,
        Decision.NOT_BILLED_FAILED,
        Decision.REJECTED,
    ]
    assert outcomes[events[0].event_id].credits == 5
    assert outcomes[events[0].event_id].balance_after == -5  # no grant: the call happened, the debit is recorded
    assert outcomes[events[3].event_id].reason and "nope" in outcomes[events[3].event_id].reason
    assert all(r.key == b"bob" for r in records)


async def test_a_batch_written_while_postgres_refuses_is_retried_not_skipped(stack, credits, database_url):
    """The ledger write fails (the schema's table is locked out), then succeeds: nothing is lost."""
    blocker = await asyncpg.connect(database_url, server_settings={"search_path": stack.database_schema})
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE")
    events = [make_event(user_id="carol") for _ in range(20)]
    await publish(stack.kafka_bootstrap, stack.settings().model_call_completed_topic, events)
    await asyncio.sleep(1.0)
    await tx.rollback()
    await blocker.close()
    await wait_for(lambda: _at_least(stack, 20), what="all 20 decided after the lock is released")
    conn = await stack.connect()
    try:
        assert await conn.fetchval("SELECT debited FROM accounts WHERE user_id='carol'") == 100
    finally:
        await conn.close()


async def test_an_event_id_reused_for_another_call_is_a_conflict_in_the_dlq_and_a_resend_is_a_duplicate(stack, credits):
    """Same id, other content (DESIGN "Same id, other content"): the first decision stands, the other
    goes to the DLQ as `conflict` with its original bytes and is counted; the same call re-sent with
    another occurred_at, tokens, latency or ending is a silent duplicate; the consumer goes on."""
    from datetime import timedelta

    from schemas.events import Ending
    from services.credits import metrics

    topic = stack.settings().model_call_completed_topic
    first = make_event(user_id="cleo", model="gpt-4o")  # 5 credits
    await publish(stack.kafka_bootstrap, topic, [first])
    await wait_for(lambda: _at_least(stack, 1), what="the first event decided")
    conflicts_before = metrics.DLQ.labels("conflict")._value.get()

    other_user = first.model_copy(update={"user_id": "mallory"})
    other_key = first.model_copy(update={"key_source": KeySource.BYOK})
    other_status = first.model_copy(update={"status": CallStatus.FAILED})
    resent = first.model_copy(
        update={
            "occurred_at": first.occurred_at + timedelta(seconds=3),
            "input_tokens": 999,
            "output_tokens": 1,
            "latency_ms": 4321,
            "ending": Ending.COMPLETED,
            "request_id": "another-request",
        }
    )
    # Two events with one new id in the same publish (same key, so the same partition and batch): the
    # first in log order is decided, the other is a conflict; a marker after them shows the consumer went on.
    twin = make_event(user_id="cleo", model="gpt-4o-mini")  # 3 credits
    twin_other = twin.model_copy(update={"model": "o1", "feature": Feature.CODE_FIX})
    after = make_event(user_id="cleo", model="claude-3-5-haiku", provider=Provider.ANTHROPIC)  # 1 credit
    await publish(stack.kafka_bootstrap, topic, [other_user, other_key, resent, other_status, twin, twin_other, after])
    await wait_for(lambda: _at_least(stack, 3), what="the marker decided after the conflicts")

    letters = await read_all(stack.kafka_bootstrap, dlq(topic), expected=100, timeout_ms=4000)
    assert sorted(r.value for r in letters) == sorted(
        [other_user.to_json(), other_key.to_json(), other_status.to_json(), twin_other.to_json()]
    ), "the conflicts, with their original bytes; the re-sent call is no dead letter"
    headers = [dict(r.headers) for r in letters]
    assert {h["dlq.error_type"] for h in headers} == {b"conflict"}
    assert all(h["dlq.source_topic"] == topic.encode() for h in headers)
    by_value = {r.value: dict(r.headers)["dlq.error"].decode() for r in letters}
    assert "user_id cleo (decided) vs mallory" in by_value[other_user.to_json()]
    assert "key_source platform (decided) vs byok" in by_value[other_key.to_json()]
    assert "status succeeded (decided) vs failed" in by_value[other_status.to_json()]
    assert "model gpt-4o-mini (decided) vs o1" in by_value[twin_other.to_json()]
    assert metrics.DLQ.labels("conflict")._value.get() - conflicts_before == 4

    conn = await stack.connect()
    try:
        rows = {
            r["event_id"]: (r["user_id"], r["model"], r["key_source"], r["status"], r["credits"])
            for r in await conn.fetch("SELECT * FROM ledger_entries")
        }
        assert rows == {
            first.event_id: ("cleo", "gpt-4o", "platform", "succeeded", 5),
            twin.event_id: ("cleo", "gpt-4o-mini", "platform", "succeeded", 3),
            after.event_id: ("cleo", "claude-3-5-haiku", "platform", "succeeded", 1),
        }
        accounts = dict(await conn.fetch("SELECT user_id, debited FROM accounts"))
        assert accounts.get("cleo") == 9 and not accounts.get("mallory")
    finally:
        await conn.close()


async def test_within_one_ledger_transaction_the_first_of_two_events_with_one_id_is_decided(ledger):
    """The set-based write compares identities inside the batch too: one transaction, two events with
    one id and different content, then the same again (a redelivery of the whole batch)."""
    from billing.policy import decide
    from billing.pricing import default_price_book
    from services.credits.ledger import Decided

    book, pool = default_price_book(), ledger.pool
    one = make_event(user_id="dora", model="gpt-4o")
    same = one.model_copy(update={"latency_ms": 77, "occurred_at": one.occurred_at})
    other = one.model_copy(update={"feature": Feature.DEEP_ANALYSIS})
    batch = [Decided(e, decide(e, book), e.to_json(), "t", 0, i) for i, e in enumerate([one, same, other])]
    first = await ledger.record(batch)
    assert (first.new, first.duplicates, first.conflicts, first.credits) == (1, 1, 1, 5)
    again = await ledger.record(batch)
    assert (again.new, again.duplicates, again.conflicts) == (0, 2, 1)
    letters = await pool.fetch("SELECT payload, headers FROM credit_outbox WHERE topic = $1", dlq("t"))
    assert [bytes(r["payload"]) for r in letters] == [other.to_json()] * 2
    assert all(json.loads(r["headers"])["dlq.error_type"] == "conflict" for r in letters)
    assert (await ledger.balance("dora")).debited == 5


async def test_a_batch_with_decided_and_new_events_is_written_again_with_the_lookup_and_only_the_new_count(ledger):
    """The ledger writes a batch optimistically (no lookup of its ids); when the key refuses it because
    some events are already decided, the transaction is written again with the lookup: the new events
    are debited once, with running balances of their own, the decided ones are duplicates, and the next
    batches look up first for a while (redeliveries come in runs)."""
    from billing.policy import decide
    from billing.pricing import default_price_book
    from services.credits import metrics
    from services.credits.ledger import Decided

    def decided(events):
        return [Decided(e, decide(e, book), e.to_json(), "t", 0, i) for i, e in enumerate(events)]

    def collisions() -> float:
        return metrics.LEDGER_COLLISIONS._value.get()

    book, pool = default_price_book(), ledger.pool
    await ledger.grant("g-eve", "eve", "pro", 100)
    old = [make_event(user_id="eve", model="gpt-4o") for _ in range(3)]  # 5 credits each
    new = [make_event(user_id="eve", model="gpt-4o") for _ in range(2)]
    before = collisions()
    first = await ledger.record(decided(old))
    assert (first.new, first.duplicates, first.debited, first.credits) == (3, 0, 3, 15)
    assert collisions() == before  # nothing was in the ledger: one transaction, no lookup needed

    # A hold on a new event, and a dead letter written in the same transaction: the refused first
    # attempt is rolled back whole, so each is settled or written once.
    await ledger.place_hold(
        new[0].event_id,
        "eve",
        5,
        decide(new[0], book).price_list_version,
        feature="chat",
        provider="openai",
        model="gpt-4o",
    )
    assert (await ledger.balance("eve")).held == 5
    letter = DeadLetter("t", 0, 99, b"eve", b"not json", "not an event", "deserialization")
    mixed = await ledger.record(decided([old[0], new[0], old[1], new[1]]), [letter])
    assert (mixed.new, mixed.duplicates, mixed.conflicts, mixed.debited, mixed.credits) == (2, 2, 0, 2, 10)
    assert collisions() == before + 1
    assert (await ledger.balance("eve")).balance == 100 - 25
    assert (await ledger.balance("eve")).held == 0
    assert await pool.fetchval("SELECT count(*) FROM credit_outbox WHERE payload = 'not json'") == 1
    after = await pool.fetch(
        "SELECT entry_id, balance_after FROM ledger_entries WHERE entry_id = ANY($1::uuid[]) ORDER BY seq",
        [e.event_id for e in new],
    )
    assert [r["balance_after"] for r in after] == [80, 75]

    # Within the window the next redelivery is looked up first: no second refused COPY.
    again = await ledger.record(decided([old[2], new[0]]))
    assert (again.new, again.duplicates) == (0, 2)
    assert collisions() == before + 1
    assert (await ledger.balance("eve")).balance == 75
    assert await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE user_id = 'eve'") == 5


async def test_a_batch_the_ledger_refuses_for_another_reason_is_raised_not_counted_as_a_redelivery(ledger):
    """Only the one-decision-per-event key means 'already decided': any other refusal reaches the
    pipeline, which isolates the record at fault (test_billing_never_stalls), and is not counted as a
    collision. Here a CHECK, and a unique key elsewhere (the dead letters' outbox, its sequence set back)."""
    from billing.policy import decide
    from billing.pricing import default_price_book
    from services.credits import metrics
    from services.credits.ledger import Decided

    book, pool = default_price_book(), ledger.pool
    bad = make_event(user_id="fay", model="gpt-4o")
    charge = decide(bad, book)
    # A debit without its price list version: the ledger's CHECK refuses it, as it would a bug.
    broken = Decided(bad, dataclasses.replace(charge, price_list_version=None), b"{}", "t", 0, 0)
    before = metrics.LEDGER_COLLISIONS._value.get()
    with pytest.raises(asyncpg.CheckViolationError):
        await ledger.record([broken])
    assert metrics.LEDGER_COLLISIONS._value.get() == before
    assert await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE user_id = 'fay'") == 0

    # The outbox's next two ids are taken: the batch's dead letter collides there, and again when
    # the batch is written a second time with the lookup.
    taken = await pool.fetchval(
        "WITH t AS (INSERT INTO credit_outbox (topic, payload) VALUES ('t.dlq', 'x'), ('t.dlq', 'y') RETURNING id)"
        " SELECT min(id) FROM t"
    )
    await pool.execute("SELECT setval(pg_get_serial_sequence('credit_outbox', 'id'), $1, false)", taken)
    good = make_event(user_id="fay", model="gpt-4o")
    letter = DeadLetter("t", 0, 1, b"fay", b"not json", "not an event", "deserialization")
    with pytest.raises(asyncpg.UniqueViolationError) as refused:
        await ledger.record([Decided(good, decide(good, book), good.to_json(), "t", 0, 2)], [letter])
    assert refused.value.constraint_name == "credit_outbox_pkey"
    assert metrics.LEDGER_COLLISIONS._value.get() == before
    assert await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE user_id = 'fay'") == 0
