"""Finance benchmark: reconcile >= 1,000,000 events, beside raw consumption of the same topic.

The topic and the ledger are deterministic (event i has id UUID(int=BASE_ID + i) and occurs at
BASE_TIME + i ms), so both are built once and reused across runs: the topic
`bench.finance.<N>.model_call_completed` and the schema `bench_finance_<N>` are checked by their
counts (and a version marker) and rebuilt only when they do not match. The ledger holds the correct
decisions (by the credit policy) except for 5 planted differences of each kind, and the topic has
5 unreadable records; the benchmark checks the reconciliation found exactly those, so the speed
measured is that of a correct run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
from aiokafka import AIOKafkaProducer

from bench import BenchEnv, Figure
from billing.policy import decide
from billing.pricing import default_price_book
from infra.topics import ensure_topics, wait_for_broker
from migrations import MigrationError
from schemas.events import ModelCallCompleted
from schemas.topics import FOREVER, MODEL_CALL_COMPLETED, TopicSpec
from services.finance.differences import Kind
from services.finance.event_log import EventLog
from services.finance.reconciliation import reconcile
from services.finance.settings import FinanceSettings
from services.finance.window import Window
from services.shared.db import migrate

VERSION = "1"  # bump when the generated data changes, to rebuild the caches
BASE_ID = 0xB0C0_0000_0000_0000_0000_0000_0000_0000
BASE_TIME = datetime(2026, 11, 20, tzinfo=timezone.utc)
USERS = 10_000
PLANTED = 5
SHAPES = [  # (provider, model, feature, key_source, status)
    ("openai", "gpt-4o", "chat", "platform", "succeeded"),
    ("openai", "gpt-4o", "chat", "byok", "succeeded"),
    ("anthropic", "claude-sonnet-4", "deep_analysis", "byok", "succeeded"),
    ("openai", "gpt-4.1", "code_fix", "platform", "succeeded"),
    ("openai", "gpt-4o", "chat", "platform", "failed"),
    ("openai", "o1", "chat", "platform", "succeeded"),
    ("anthropic", "claude-3-5-haiku", "chat", "platform", "succeeded"),
    ("openai", "gpt-4o-mini", "chat", "platform", "succeeded"),
    ("groq", "llama-4-scout", "code_canvas", "byok", "succeeded"),
    ("gemini", "gemini-2.5-pro", "chat", "platform", "succeeded"),
]


def event_id(i: int) -> uuid.UUID:
    return uuid.UUID(int=BASE_ID + i)


def occurred_ms(i: int) -> int:
    return int(BASE_TIME.timestamp() * 1000) + i


def event_json(i: int) -> bytes:
    provider, model, feature, key_source, status = SHAPES[i % len(SHAPES)]
    at = (BASE_TIME + timedelta(milliseconds=i)).isoformat().replace("+00:00", "Z")
    return (
        f'{{"event_id":"{event_id(i)}","schema_version":1,"occurred_at":"{at}","user_id":"bench-user-{i % USERS}",'
        f'"session_id":"s{i % USERS}","request_id":"r{i}","provider":"{provider}","model":"{model}",'
        f'"feature":"{feature}","key_source":"{key_source}","status":"{status}","input_tokens":{i % 997},'
        f'"output_tokens":{i % 499},"latency_ms":{i % 1500}}}'
    ).encode()


def planted(kind_no: int, shape: int) -> list[int]:
    """Indices of the events given the `kind_no`-th planted difference (all of one shape)."""
    return [shape + len(SHAPES) * (1000 * kind_no + j) for j in range(PLANTED)]


MISSING, DOUBLE, WRONG, BYOK, FAILED = planted(0, 0), planted(1, 0), planted(2, 0), planted(3, 1), planted(4, 4)
GHOSTS = [uuid.UUID(int=BASE_ID - 1 - j) for j in range(PLANTED)]
JUNK = [b'{"event_id": "bench junk ' + str(j).encode() for j in range(PLANTED)]


async def ensure_topic(env: BenchEnv, prefix: str, n: int) -> str:
    """The topic with its n events + the junk records, produced once and reused after."""
    topic = prefix + MODEL_CALL_COMPLETED
    admin = await wait_for_broker(env.kafka_bootstrap, 60)
    try:
        await ensure_topics(admin, [TopicSpec(topic, FOREVER, 6)])
        async with EventLog(env.kafka_bootstrap, topic) as log:
            held = sum(r.size for r in await log.plan())
        if held == n + len(JUNK):
            return topic
        if held:
            await admin.delete_topics([topic])
            await asyncio.sleep(2)
            await ensure_topics(admin, [TopicSpec(topic, FOREVER, 6)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=env.kafka_bootstrap,
        acks="all",
        compression_type="gzip",
        linger_ms=50,
        max_batch_size=1024 * 1024,
        max_request_size=8 * 1024 * 1024,
    )
    await producer.start()
    try:
        pending = []
        for i in range(n):
            pending.append(
                await producer.send(
                    topic, event_json(i), key=f"bench-user-{i % USERS}".encode(), timestamp_ms=occurred_ms(i)
                )
            )
            if len(pending) >= 50_000:
                await asyncio.gather(*pending)
                pending = []
        for j, junk in enumerate(JUNK):
            pending.append(await producer.send(topic, junk, key=b"junk", timestamp_ms=occurred_ms(500 + j)))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return topic


async def ensure_ledger(env: BenchEnv, schema: str, n: int) -> None:
    """The ledger the credit service would have written, with the planted differences."""
    try:
        await migrate(env.database_url, schema)
    except MigrationError:  # a cached schema from before a migration changed: rebuild it
        pass
    else:
        conn = await asyncpg.connect(env.database_url, server_settings={"search_path": schema})
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_meta (version text, events int)")
            if await conn.fetchval("SELECT count(*) FROM bench_meta WHERE version = $1 AND events = $2", VERSION, n):
                return
        finally:
            await conn.close()
    admin = await asyncpg.connect(env.database_url)
    await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
    await admin.close()
    await migrate(env.database_url, schema)
    book = default_price_book()
    # The charge of each shape, by the credit policy (all events fall under one price list).
    # The charge of each shape, by the credit policy (event s has shape s; one price list in force).
    charges = [decide(ModelCallCompleted.model_validate_json(event_json(s)), book) for s in range(len(SHAPES))]
    skip = set(MISSING)
    override = {i: ("debited", 20) for i in WRONG} | {i: ("debited", 5) for i in BYOK + FAILED}
    columns = (
        "entry_id",
        "event_id",
        "kind",
        "user_id",
        "decision",
        "credits",
        "price_list_version",
        "provider",
        "model",
        "feature",
        "key_source",
        "status",
        "occurred_at",
    )

    def rows(lo: int, hi: int):
        for i in range(lo, hi):
            if i in skip:
                continue
            provider, model, feature, key_source, status = SHAPES[i % len(SHAPES)]
            c = charges[i % len(SHAPES)]
            decision, credits = override.get(i, (c.decision.value, c.credits))
            eid = event_id(i)
            yield (
                eid,
                eid,
                "decision",
                f"bench-user-{i % USERS}",
                decision,
                credits,
                c.price_list_version,
                provider,
                model,
                feature,
                key_source,
                status,
                BASE_TIME + timedelta(milliseconds=i),
            )

    conn = await asyncpg.connect(env.database_url, server_settings={"search_path": schema})
    try:
        await conn.execute("CREATE TABLE bench_meta (version text, events int)")
        await conn.execute(
            "INSERT INTO accounts (user_id) SELECT 'bench-user-' || g FROM generate_series(0, $1) g", USERS - 1
        )
        await conn.execute("INSERT INTO grants SELECT 'g-' || user_id, user_id, 'standard', 500 FROM accounts")
        for lo in range(0, n, 200_000):
            await conn.copy_records_to_table(
                "ledger_entries", records=list(rows(lo, min(n, lo + 200_000))), columns=columns
            )
        extra = [
            (
                uuid.uuid4(),
                event_id(i),
                "correction",
                f"bench-user-{i % USERS}",
                "correction",
                5,
                "2026-01",
                None,
                None,
                None,
                None,
                None,
                BASE_TIME + timedelta(milliseconds=i),
            )
            for i in DOUBLE
        ]
        extra += [
            (
                g,
                g,
                "decision",
                "bench-user-0",
                "debited",
                3,
                "2026-01",
                None,
                None,
                None,
                None,
                None,
                BASE_TIME + timedelta(milliseconds=100),
            )
            for g in GHOSTS
        ]
        await conn.copy_records_to_table("ledger_entries", records=extra, columns=columns)
        await conn.execute("ANALYZE ledger_entries")
        await conn.execute("INSERT INTO bench_meta VALUES ($1, $2)", VERSION, n)
    finally:
        await conn.close()


async def raw_consumption(env: BenchEnv, topic: str) -> tuple[int, float]:
    """The baseline: the same consumer reading the same records, doing nothing with them."""
    began = time.perf_counter()
    count = 0
    async with EventLog(env.kafka_bootstrap, topic) as log:
        async for records in log.read(await log.plan()):
            count += len(records)
    return count, time.perf_counter() - began


async def run(env: BenchEnv) -> list[Figure]:
    n = 50_000 if env.quick else 1_000_000
    prefix, schema = f"bench.finance.{n}.", f"bench_finance_{n}"
    began = time.perf_counter()
    topic = await ensure_topic(env, prefix, n)
    await ensure_ledger(env, schema, n)
    print(f"  finance: data ready in {time.perf_counter() - began:.1f} s", flush=True)

    raw_count, raw_s = await raw_consumption(env, topic)
    settings = FinanceSettings(
        kafka_bootstrap_servers=env.kafka_bootstrap,
        database_url=env.database_url,
        database_schema=schema,
        topic_prefix=prefix,
    )
    window = Window(BASE_TIME, BASE_TIME + timedelta(milliseconds=n))
    report = await reconcile(settings, window)

    print(
        f"  finance: raw {raw_count:,} records in {raw_s:.1f} s; reconcile {report.elapsed_s:.1f} s "
        f"(phases {', '.join(f'{k} {v:.1f}' for k, v in report.phases.items())}), {report.tally}",
        flush=True,
    )
    counts = {k: c for k, (c, _) in report.counts().items()}
    expected = {k: 0 if k is Kind.DEBIT_ON_WRONG_ACCOUNT else PLANTED for k in counts}
    if counts != expected or report.pending or report.tally.in_window != n:
        raise AssertionError(f"the benchmark's reconciliation is wrong: {counts}, {report.tally}")
    rate, raw_rate = report.tally.records / report.elapsed_s, raw_count / raw_s
    label = f"{n // 1000}k" if n < 1_000_000 else f"{n / 1e6:g}M"
    return [
        Figure(
            "finance",
            f"reconcile {label} events",
            report.elapsed_s,
            "s",
            "raw aiokafka consumption of the same topic",
            raw_s,
            better="lower",
            target="< 60 s for 1M",
        ),
        Figure(
            "finance",
            "events reconciled per second",
            rate,
            "events/s",
            "raw aiokafka consumption",
            raw_rate,
            better="higher",
            target=">= 16,667 events/s",
        ),
    ]
