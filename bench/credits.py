"""Credit service benchmark.

Throughput: a topic pre-filled with 200,000 events drained into the committed ledger by the real
credit service (FastStream batch consumer, group commit, outcome relay running). Baselines in the
same run: the naive design (one transaction and one offset commit per event), the raw bounds (plain
aiokafka consumption of the same topic; a plain COPY of the same rows), and, for context, a COPY of
the same rows into the ledger table itself (its key, indexes and sums trigger).
Latency: publish-to-committed-debit at a steady rate of half the measured maximum (the issue's
figure), and at 2,000 events/s for context; the publisher runs in a separate process on the same
machine, so on a small one it takes part of the capacity the maximum was measured with.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
import uuid
from datetime import datetime, timezone
from random import Random

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from bench import BenchEnv, Figure, percentile
from billing.policy import decide
from billing.pricing import default_price_book
from infra.topics import ensure_topics, wait_for_broker
from schemas.events import CallStatus, Feature, KeySource, ModelCallCompleted, Provider
from schemas.topics import MODEL_CALL_COMPLETED, topic_specs
from services.credits.bootstrap import running
from services.credits.ledger import LEDGER_COLUMNS, Ledger, decision_row
from services.credits.settings import CreditSettings
from services.shared.db import migrate

MODELS = [
    ("gpt-4o", KeySource.PLATFORM),
    ("claude-3-5-haiku", KeySource.PLATFORM),
    ("o3-mini", KeySource.PLATFORM),
    ("gpt-4o", KeySource.BYOK),
    ("gemini-2.5-pro", KeySource.PLATFORM),
]


def event(i: int, request_id: str | None = None) -> ModelCallCompleted:
    model, source = MODELS[i % len(MODELS)]
    return ModelCallCompleted(
        event_id=uuid.uuid4(),
        occurred_at=datetime.now(timezone.utc),
        user_id=f"user-{i % 1000}",
        session_id="bench",
        request_id=request_id or str(i),
        provider=Provider.OPENAI,
        model=model,
        feature=Feature.CHAT,
        key_source=source,
        status=CallStatus.SUCCEEDED,
        input_tokens=100,
        output_tokens=200,
        latency_ms=50,
    )


async def topic_size(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            return 0
        tps = [TopicPartition(topic, p) for p in parts]
        ends, starts = await consumer.end_offsets(tps), await consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        await consumer.stop()


async def prefill(bootstrap: str, topic: str, n: int) -> None:
    """Fill `topic` with n events once; later runs reuse it (its name carries n)."""
    admin = await wait_for_broker(bootstrap, 60)
    try:  # every topic of the prefix: the service also publishes outcomes and dead letters
        await ensure_topics(admin, topic_specs(prefix=topic.removesuffix(MODEL_CALL_COMPLETED)))
    finally:
        await admin.close()
    have = await topic_size(bootstrap, topic)
    if have >= n:
        return
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024, compression_type=None
    )
    await producer.start()
    try:
        for start in range(have, n, 10_000):
            futures = [
                await producer.send(topic, e.to_json(), key=e.user_id.encode())
                for e in (event(i) for i in range(start, min(start + 10_000, n)))
            ]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def fresh_schema(url: str) -> str:
    schema = "bench_" + uuid.uuid4().hex[:8]
    await migrate(url, schema)
    return schema


async def drop_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await conn.close()


async def ledger_count(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM ledger_entries")


async def entries_started(pool) -> int:
    """Ledger rows numbered so far, committed or not: a cheap upper bound of ledger_count.

    Polling count(*) of a growing table every few milliseconds would itself take a large share of
    PostgreSQL's CPU and slow what is being measured; the sequence costs nothing to read.
    """
    return await pool.fetchval("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM ledger_entries_seq_seq")


async def run_service(env: BenchEnv, topic_prefix: str, n: int) -> float:
    """Events/s of the credit service draining n pre-filled events into the committed ledger."""
    schema = await fresh_schema(env.database_url)
    settings = CreditSettings(
        kafka_bootstrap_servers=env.kafka_bootstrap,
        database_url=env.database_url,
        database_schema=schema,
        topic_prefix=topic_prefix,
        consumer_group="bench-" + uuid.uuid4().hex[:8],
    )
    try:
        async with running(settings) as rt:
            while await entries_started(rt.pool) == 0:
                await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            while await entries_started(rt.pool) < n:
                await asyncio.sleep(0.02)
            while (count := await ledger_count(rt.pool)) < n:  # the last batch's commit
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - t0
            return count / elapsed
    finally:
        await drop_schema(env.database_url, schema)


async def run_naive(env: BenchEnv, topic: str, n: int) -> float:
    """One event at a time: one transaction and one offset commit each."""
    schema = await fresh_schema(env.database_url)
    book = default_price_book()
    conn = await asyncpg.connect(env.database_url, server_settings={"search_path": schema})
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=env.kafka_bootstrap,
        group_id="naive-" + uuid.uuid4().hex[:8],
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        done, t0 = 0, None
        while done < n:
            record = await consumer.getone()
            t0 = t0 or time.perf_counter()
            e = ModelCallCompleted.from_json(record.value)
            c = decide(e, book)
            async with conn.transaction():
                await conn.execute("INSERT INTO accounts (user_id) VALUES ($1) ON CONFLICT DO NOTHING", e.user_id)
                await conn.execute(
                    f"INSERT INTO ledger_entries ({', '.join(LEDGER_COLUMNS)}) VALUES "
                    "($1,$1,'decision',$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,NULL) ON CONFLICT DO NOTHING",
                    e.event_id,
                    e.user_id,
                    c.decision.value,
                    c.credits,
                    c.price_list_version,
                    c.reason,
                    e.provider.value,
                    e.model,
                    e.feature.value,
                    e.key_source.value,
                    e.status.value,
                    e.occurred_at,
                )
            await consumer.commit({TopicPartition(record.topic, record.partition): record.offset + 1})
            done += 1
        return done / (time.perf_counter() - t0)
    finally:
        await consumer.stop()
        await conn.close()
        await drop_schema(env.database_url, schema)


async def run_raw_consume(env: BenchEnv, topic: str, n: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=env.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        done, t0 = 0, None
        while done < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            t0 = t0 or time.perf_counter()
            done += sum(len(rs) for rs in batch.values())
        return done / (time.perf_counter() - t0)
    finally:
        await consumer.stop()


def ledger_rows(n: int) -> list[tuple]:
    book = default_price_book()
    return [decision_row(e, decide(e, book), 0) for e in map(event, range(n))]


async def run_ledger_copy(env: BenchEnv, n: int) -> float:
    """COPY of the same rows into the ledger table itself (its key, indexes and sums trigger), 5,000
    per transaction, accounts created beforehand: what the database alone can take, for context."""
    rows = ledger_rows(n)
    schema = await fresh_schema(env.database_url)
    conn = await asyncpg.connect(env.database_url, server_settings={"search_path": schema})
    try:
        await conn.execute("INSERT INTO accounts (user_id) SELECT DISTINCT unnest($1::text[])", [r[3] for r in rows])
        t0 = time.perf_counter()
        for i in range(0, n, 5000):
            async with conn.transaction():
                await conn.copy_records_to_table("ledger_entries", records=rows[i : i + 5000], columns=LEDGER_COLUMNS)
        return n / (time.perf_counter() - t0)
    finally:
        await conn.close()
        await drop_schema(env.database_url, schema)


async def run_raw_copy(env: BenchEnv, n: int) -> float:
    """A plain COPY of the same rows (same columns, no constraints, no triggers), 5,000 per transaction."""
    rows = ledger_rows(n)
    schema = "bench_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(env.database_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(
            f'''CREATE TABLE "{schema}".plain (entry_id uuid, event_id uuid, kind text, user_id text, decision text,
                credits bigint, price_list_version text, reason text, provider text, model text, feature text,
                key_source text, status text, occurred_at timestamptz, balance_after bigint)'''
        )
        t0 = time.perf_counter()
        for i in range(0, n, 5000):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "plain", schema_name=schema, records=rows[i : i + 5000], columns=LEDGER_COLUMNS
                )
        return n / (time.perf_counter() - t0)
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


def _steady_publisher(bootstrap: str, topic: str, rate: float, seconds: float) -> None:
    """Publish `rate` events/s for `seconds`, each stamped (request_id) with the time it was due, in ns.

    It shares the machine with what it measures, so it is built to cost little CPU: every 5 ms (a
    producer's linger), the events due are sent as one batch per partition, as the chat outbox relay
    sends its batches, keyed by user like any emitter's, from JSON templates of valid events. One
    producer.send per event cost three quarters of a core at 10,000 events/s. Stamping the due time,
    not the send time, keeps the batching wait inside the measured latency.
    """
    # A valid event's JSON with four fields left open; uuid4 (os.urandom) and json.dumps per event
    # were most of this process's CPU.
    sentinel = ModelCallCompleted.model_validate(
        event(0).model_dump() | {"event_id": uuid.UUID(int=0), "user_id": "USER", "request_id": "REQUEST"}
    )
    templates = []
    for i in range(len(MODELS)):
        fields = json.loads(sentinel.model_copy(update={"model": MODELS[i][0], "key_source": MODELS[i][1]}).to_json())
        text = json.dumps(
            fields | {"event_id": "@ID@", "occurred_at": "@AT@", "user_id": "@USER@", "request_id": "@REQ@"}
        )
        templates.append(
            text.replace("%", "%%")
            .replace("@ID@", "%s")
            .replace("@AT@", "%s")
            .replace("@USER@", "%s")
            .replace("@REQ@", "%s")
        )
    random = Random()

    async def go():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            partitions = sorted(await producer.partitions_for(topic))
            partitioner = DefaultPartitioner()
            partition_of = {u: partitioner(f"user-{u}".encode(), partitions, partitions) for u in range(1000)}
            futures = []
            t0, t0_ns = time.perf_counter(), time.time_ns()
            i = 0
            while (elapsed := time.perf_counter() - t0) < seconds:
                due = int(elapsed * rate)
                batches = {}
                now = datetime.now(timezone.utc).isoformat()
                while i < due:
                    user = f"user-{i % 1000}"
                    value = templates[i % len(MODELS)] % (
                        uuid.UUID(int=random.getrandbits(128), version=4),
                        now,
                        user,
                        t0_ns + int(i * 1e9 / rate),
                    )
                    p = partition_of[i % 1000]
                    batch = batches.get(p) or batches.setdefault(p, producer.create_batch())
                    if batch.append(key=user.encode(), value=value.encode(), timestamp=None) is None:
                        break  # full: the rest goes in the next round
                    i += 1
                for p, batch in batches.items():
                    batch.close()
                    futures.append(await producer.send_batch(batch, topic, partition=p))
                await asyncio.sleep(0.005)
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(go())


class TimedLedger(Ledger):
    """Notes, for every event, when its batch's transaction committed."""

    latencies_ms: list[float] = []

    async def record(self, decided, letters=()):
        result = await super().record(decided, letters)
        now = time.time_ns()
        self.latencies_ms.extend((now - int(d.event.request_id)) / 1e6 for d in decided)
        return result


async def run_latency(env: BenchEnv, rate: float, seconds: float) -> tuple[float, float, int]:
    prefix = "bench-lat-" + uuid.uuid4().hex[:6] + "."
    admin = await wait_for_broker(env.kafka_bootstrap, 60)
    try:
        await ensure_topics(admin, topic_specs(prefix=prefix))
        schema = await fresh_schema(env.database_url)
        settings = CreditSettings(
            kafka_bootstrap_servers=env.kafka_bootstrap,
            database_url=env.database_url,
            database_schema=schema,
            topic_prefix=prefix,
        )
        TimedLedger.latencies_ms = []
        async with running(settings, ledger_factory=TimedLedger) as rt:
            while await rt.lag() is None:  # wait for the partition assignment
                await asyncio.sleep(0.05)
            proc = multiprocessing.get_context("spawn").Process(
                target=_steady_publisher, args=(env.kafka_bootstrap, settings.model_call_completed_topic, rate, seconds)
            )
            proc.start()
            while proc.is_alive():
                await asyncio.sleep(0.1)
            expected = int(rate * seconds)
            deadline = time.monotonic() + 30
            while len(TimedLedger.latencies_ms) < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        samples = TimedLedger.latencies_ms[int(len(TimedLedger.latencies_ms) * 0.1) :]  # skip the warm-up
        await drop_schema(env.database_url, schema)
        return percentile(samples, 50), percentile(samples, 99), len(TimedLedger.latencies_ms)
    finally:
        await admin.delete_topics([s.name for s in topic_specs(prefix=prefix)])
        await admin.close()


async def run(env: BenchEnv) -> list[Figure]:
    n = 20_000 if env.quick else 200_000
    naive_n = 2_000 if env.quick else 10_000
    prefix = f"bench-credits-{n}."
    topic = prefix + "model_call_completed"
    await prefill(env.kafka_bootstrap, topic, n)

    service = await run_service(env, prefix, n)
    naive = await run_naive(env, topic, naive_n)
    raw_consume = await run_raw_consume(env, topic, n)
    raw_copy = await run_raw_copy(env, n)
    ledger_copy = await run_ledger_copy(env, n)
    bound = min(raw_consume, raw_copy)
    rate = service / 2
    p50, p99, samples = await run_latency(env, rate, 5 if env.quick else 10)
    low_rate = 2000
    low_p50, low_p99, low_samples = await run_latency(env, low_rate, 5 if env.quick else 10)
    name = "credits"
    return [
        Figure(
            name,
            f"throughput, {n:,} pre-filled events",
            service,
            "events/s",
            "naive (1 txn + commit per event)",
            naive,
            target=">= 10x",
        ),
        Figure(
            name,
            "throughput vs raw bound",
            service,
            "events/s",
            "slower raw bound (" + ("aiokafka" if raw_consume < raw_copy else "COPY") + ")",
            bound,
            target=">= 0.5x",
        ),
        Figure(name, "raw aiokafka consumption", raw_consume, "events/s"),
        Figure(name, "raw COPY of the same rows", raw_copy, "events/s"),
        Figure(
            name,
            "throughput vs COPY into the ledger table itself",
            service,
            "events/s",
            "COPY into ledger_entries (key, indexes, sums trigger)",
            ledger_copy,
        ),
        Figure(name, f"publish->committed debit p50 at {rate:,.0f}/s ({samples:,} events)", p50, "ms", better="lower"),
        Figure(name, f"publish->committed debit p99 at {rate:,.0f}/s", p99, "ms", better="lower", target="< 100 ms"),
        Figure(
            name,
            f"publish->committed debit p50 at {low_rate:,}/s ({low_samples:,} events)",
            low_p50,
            "ms",
            better="lower",
        ),
        Figure(name, f"publish->committed debit p99 at {low_rate:,}/s", low_p99, "ms", better="lower"),
    ]
