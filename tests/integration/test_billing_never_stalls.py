"""One odd record never stops billing, and a stall is seen (issue: billing never stalls).

On the real broker and database: edge records interleaved with a bystander's normal events, the
ledger's acceptance of anything intake accepts, a write the database refuses for one event, and a
database restart in the middle of the traffic.
"""

import asyncio
import json
from collections import Counter

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import given, settings

from billing.policy import decide
from billing.pricing import default_price_book
from schemas.topics import dlq
from services.credits.bootstrap import running
from services.credits.ledger import Decided, Ledger
from services.credits.settings import CreditSettings
from services.shared.kafka import NotAnEvent, read_model_call
from tests.edge_records import edge_records, event_fields
from tests.integration.test_credit_consumer import read_all
from tests.support import make_event, wait_for

pytestmark = pytest.mark.integration


async def send_in_order(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> list:
    """Send (key, value) pairs in order; returns each one's RecordMetadata (partition and offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        return [await producer.send_and_wait(topic, value, key=key) for key, value in items]
    finally:
        await producer.stop()


async def decided_ids(conn: asyncpg.Connection) -> dict[str, str]:
    return {str(k): v for k, v in await conn.fetch("SELECT entry_id, decision FROM ledger_entries")}


async def test_every_edge_record_ends_in_exactly_one_place_and_the_bystander_is_billed(stack):
    topic = stack.settings().model_call_completed_topic
    odd = edge_records()
    bystander = [make_event(user_id="bystander", model="gpt-4o") for _ in range(len(odd) + 1)]
    items: list[tuple[bytes, bytes]] = []
    for i, record in enumerate(odd):  # one key: all in one partition, each odd record between two good ones
        items += [(b"edge", bystander[i].to_json()), (b"edge", record.value)]
    items.append((b"edge", bystander[-1].to_json()))
    sent = await send_in_order(stack.kafka_bootstrap, topic, items)
    positions = [(m.partition, m.offset) for m in sent[1::2]]

    async with running(stack.settings(CreditSettings)):
        conn = await stack.connect()
        try:

            async def all_bystanders_decided():
                return len({str(e.event_id) for e in bystander} & set(await decided_ids(conn))) == len(bystander)

            await wait_for(all_bystanders_decided, timeout_s=60, what="every bystander event decided")
            assert await conn.fetchval("SELECT debited FROM accounts WHERE user_id = 'bystander'") == 5 * len(bystander)
            decided = await decided_ids(conn)
            outcome_of = {i: next((decided[e] for e in r.event_ids if e in decided), None) for i, r in enumerate(odd)}
            # A "rejected" decision (an unpriced model) is also sent to the DLQ, for finance: one letter each.
            expected_letters = sum(1 for v in outcome_of.values() if v in (None, "rejected"))
            letters = await read_all(stack.kafka_bootstrap, dlq(topic), expected=expected_letters)
            letter_at = Counter(
                (int(dict(r.headers)["dlq.source_partition"]), int(dict(r.headers)["dlq.source_offset"]))
                for r in letters
            )
            where = {}
            for i, record in enumerate(odd):
                places = (outcome_of[i] is not None) + letter_at[positions[i]] - (outcome_of[i] == "rejected")
                where[record.label] = outcome_of[i] or "dead letter"
                assert places == 1, f"{record.edge_class} / {record.label}: in {places} places"
            assert await conn.fetchval("SELECT count(*) FROM parked_messages") == 0
        finally:
            await conn.close()
    # What each class of edge record became (shown with -s; the note of the issue lists it).
    for label, place in where.items():
        print(f"  {label}: {place}")
    accepted = {r.label for r in odd if where[r.label] != "dead letter"}
    assert "year 1 with +01:00" not in accepted and "2020-01-01 UTC (the first allowed)" in accepted
    assert "user_id NUL" not in accepted and "user_id emoji" in accepted


async def test_the_ledger_writes_any_event_intake_accepts(stack):
    accepted = []

    @settings(max_examples=300, deadline=None, database=None)
    @given(event_fields())
    def collect(fields):
        read = read_model_call(json.dumps(fields).encode())
        if not isinstance(read, NotAnEvent):
            accepted.append(read)

    collect()
    assert len(accepted) > 50
    book = default_price_book()
    pool = await asyncpg.create_pool(
        stack.database_url, min_size=1, max_size=2, server_settings={"search_path": stack.database_schema}
    )
    try:
        ledger = Ledger(pool)
        for event in accepted:  # one transaction each: a failure names its event
            try:
                await ledger.record([Decided(event, decide(event, book))])
            except Exception as exc:
                pytest.fail(f"the ledger refused an event intake accepted: {event!r}: {exc!r}")
        assert await pool.fetchval("SELECT count(*) FROM ledger_entries") == len({e.event_id for e in accepted})
    finally:
        await pool.close()


async def test_a_record_the_database_refuses_is_dead_lettered_and_the_rest_of_its_batch_commits(stack):
    topic = stack.settings().model_call_completed_topic
    events = [make_event(user_id=f"u{i % 3}", model="gpt-4o-mini") for i in range(60)]
    refused = events[37]
    conn = await stack.connect()
    try:
        # A stand-in for any write the database refuses for its content (a constraint, an overflow, ...).
        await conn.execute(f"""
            CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.entry_id = '{refused.event_id}' THEN
                    RAISE EXCEPTION 'this event is refused by the test' USING ERRCODE = 'check_violation';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_one BEFORE INSERT ON ledger_entries FOR EACH ROW EXECUTE FUNCTION refuse_one();""")
        # Published before the service starts, so they arrive as one batch, one transaction.
        await send_in_order(stack.kafka_bootstrap, topic, [(e.user_id.encode(), e.to_json()) for e in events])
        async with running(stack.settings(CreditSettings)) as runtime:
            await wait_for(lambda: _count(conn, 59), timeout_s=60, what="59 events decided")
            letters = await read_all(stack.kafka_bootstrap, dlq(topic), expected=1)
            assert [r.value for r in letters] == [refused.to_json()]
            headers = {k: v.decode() for k, v in letters[0].headers}
            assert headers["dlq.error_type"] == "ledger_write"
            assert "this event is refused by the test" in headers["dlq.error"]
            decided = await decided_ids(conn)
            assert str(refused.event_id) not in decided and len(decided) == 59
            later = make_event(user_id="u0", model="gpt-4o-mini")  # and billing goes on
            await send_in_order(stack.kafka_bootstrap, topic, [(b"u0", later.to_json())])
            await wait_for(lambda: _count(conn, 60), timeout_s=30, what="the next event decided")
            async with httpx.AsyncClient(transport=httpx.ASGITransport(runtime.api()), base_url="http://c") as client:
                health = (await client.get("/healthz")).json()
            assert health["status"] == "ok" and health["stalled"] is False
        debited = dict(await conn.fetch("SELECT user_id, debited FROM accounts"))
        assert sum(debited.values()) == 3 * 60  # 59 + 1 later, minus the refused one, at 3 credits
    finally:
        await conn.close()


async def _count(conn, n: int) -> bool:
    return await conn.fetchval("SELECT count(*) FROM ledger_entries") >= n


@pytest.mark.slow
async def test_a_database_restart_in_the_middle_is_retried_not_dead_lettered_and_the_stall_is_visible(
    kafka_bootstrap, kafka_topics, private_postgres
):
    from services.shared.db import migrate

    schema = "stall_test"
    await migrate(private_postgres.url, schema)
    settings = CreditSettings(
        kafka_bootstrap_servers=kafka_bootstrap,
        database_url=private_postgres.url,
        database_schema=schema,
        topic_prefix=kafka_topics,
        stall_after_s=2.0,
        relay_mode="off",
    )
    topic = settings.model_call_completed_topic
    first = [make_event(user_id="dora", model="gpt-4o-mini") for _ in range(50)]
    second = [make_event(user_id="dora", model="gpt-4o-mini") for _ in range(50)]

    async def count() -> int:
        conn = await asyncpg.connect(private_postgres.url, server_settings={"search_path": schema})
        try:
            return await conn.fetchval("SELECT count(*) FROM ledger_entries")
        finally:
            await conn.close()

    async with running(settings) as runtime:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(runtime.api()), base_url="http://c") as client:
            await send_in_order(kafka_bootstrap, topic, [(b"dora", e.to_json()) for e in first])
            await wait_for(lambda: _at(count, 50), timeout_s=30, what="the first 50 decided")
            await asyncio.to_thread(private_postgres.stop)
            await send_in_order(kafka_bootstrap, topic, [(b"dora", e.to_json()) for e in second])

            async def stalled():
                response = await client.get("/healthz")
                return response.status_code == 503 and response.json().get("stalled")

            await wait_for(stalled, timeout_s=30, what="/healthz reporting the stall")
            body = (await client.get("/healthz")).json()
            assert body["events_waiting"] >= 1 and "stalled" in body["message"]
            metrics = (await client.get("/metrics")).text
            assert "credits_stalled 1.0" in metrics
            await asyncio.to_thread(private_postgres.start)
            await wait_for(lambda: _at(count, 100), timeout_s=60, what="all 100 decided after the restart")

            async def healthy():
                return (await client.get("/healthz")).status_code == 200

            await wait_for(healthy, timeout_s=15, what="/healthz ok again")
            assert "credits_stalled 0.0" in (await client.get("/metrics")).text
    letters = await read_all(kafka_bootstrap, dlq(topic), expected=1, timeout_ms=2000)
    assert letters == [], "a database outage must be retried, never dead-lettered"
    conn = await asyncpg.connect(private_postgres.url, server_settings={"search_path": schema})
    try:
        assert await conn.fetchval("SELECT debited FROM accounts WHERE user_id = 'dora'") == 300
        assert await conn.fetchval("SELECT count(*) FROM credit_outbox") == 0  # no dead letter was even queued
    finally:
        await conn.close()


async def _at(count, n: int) -> bool:
    try:
        return await count() >= n
    except (OSError, asyncpg.PostgresError):
        return False


async def test_relays_park_a_message_kafka_refuses_and_publish_the_rest(stack):
    """A row no broker will take (larger than the producer's 4 MB limit) is parked, never retried forever."""
    from services.chat.outbox import OutboxRelay
    from services.credits.relay import OutcomeRelay
    from services.shared.kafka import make_producer

    settings = stack.settings()
    topic = settings.model_call_completed_topic
    huge = b"x" * (5 * 1024 * 1024)
    normal = make_event(user_id="erin")
    pool = await asyncpg.create_pool(
        stack.database_url, min_size=1, max_size=3, server_settings={"search_path": stack.database_schema}
    )
    producer = make_producer(stack.kafka_bootstrap)
    await producer.start()
    try:
        # The chat's outbox: a huge row, then a normal event behind it.
        await pool.execute(
            "INSERT INTO chat_outbox (event_id, user_id, payload, ready) VALUES (gen_random_uuid(), 'erin', $1, true)",
            huge,
        )
        await pool.execute(
            "INSERT INTO chat_outbox (event_id, user_id, payload, ready) VALUES ($1, 'erin', $2, true)",
            normal.event_id,
            normal.to_json(),
        )
        chat_relay = OutboxRelay(pool, lambda: make_producer(stack.kafka_bootstrap), topic)
        try:
            assert await asyncio.wait_for(chat_relay.relay_once(), 30) == 2
        finally:
            await chat_relay.stop()
        published = await read_all(stack.kafka_bootstrap, topic, expected=1)
        assert [r.value for r in published] == [normal.to_json()]
        # The credit service's outbox of dead letters: the same.
        await pool.execute(
            "INSERT INTO credit_outbox (topic, key, payload, headers) VALUES ($1, 'k', $2, '{}')", dlq(topic), huge
        )
        await pool.execute(
            "INSERT INTO credit_outbox (topic, key, payload, headers) VALUES ($1, 'k', 'small', '{}')", dlq(topic)
        )
        assert await asyncio.wait_for(OutcomeRelay(pool, producer, settings.credit_ledger_topic).run_once(), 30) == 2
        letters = await read_all(stack.kafka_bootstrap, dlq(topic), expected=1)
        assert [r.value for r in letters] == [b"small"]
        parked = await pool.fetch("SELECT source, length(payload) AS size, error FROM parked_messages ORDER BY id")
        assert [(p["source"], p["size"]) for p in parked] == [("chat_outbox", len(huge)), ("credit_outbox", len(huge))]
        assert all("MessageSizeTooLarge" in p["error"] for p in parked)
        assert await pool.fetchval("SELECT count(*) FROM chat_outbox") == 0
        assert await pool.fetchval("SELECT count(*) FROM credit_outbox") == 0
    finally:
        await producer.stop()
        await pool.close()


async def test_a_stopping_chat_relay_sends_what_is_ready_rather_than_leaving_it_for_its_next_start(stack):
    """The chat's relay waits after a wake-up for more events to send with the first (its linger); a chat
    stopped meanwhile sends what is ready on its way out: a lone instance would otherwise keep those
    calls unbilled until it starts again."""
    from services.chat.outbox import OutboxRelay
    from services.shared.kafka import make_producer

    topic = stack.settings().model_call_completed_topic
    pool = await asyncpg.create_pool(
        stack.database_url, min_size=1, max_size=3, server_settings={"search_path": stack.database_schema}
    )
    relay = OutboxRelay(pool, lambda: make_producer(stack.kafka_bootstrap), topic, linger_s=600, idle_poll_s=600)
    try:
        await relay.start()
        await asyncio.sleep(1)  # its first round (nothing due) is done: it waits for a wake-up
        events = [make_event(user_id="frank") for _ in range(3)]
        for event in events:
            await pool.execute(
                "INSERT INTO chat_outbox (event_id, user_id, payload, ready) VALUES ($1, 'frank', $2, true)",
                event.event_id,
                event.to_json(),
            )
        relay.wake()
        await asyncio.sleep(0.5)  # the relay is lingering now: nothing sent yet
        assert await pool.fetchval("SELECT count(*) FROM chat_outbox") == 3
        await asyncio.wait_for(relay.stop(), 30)
        assert await pool.fetchval("SELECT count(*) FROM chat_outbox") == 0
        published = await read_all(stack.kafka_bootstrap, topic, expected=3)
        assert sorted(r.value for r in published) == sorted(e.to_json() for e in events)
    finally:
        await relay.stop()
        await pool.close()
