"""Credits throughput with one and with two consumer processes (`python -m services.credits`, each a
static member under its own instance name, the outbox relay running in each): a topic pre-filled with
events drained into the committed ledger, timed from the first committed entry to the last. On a
machine of two cores, shared with Kafka, PostgreSQL and the publisher, a second process mostly
competes for the same CPU: the figure says what is measured, not what more cores would give.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from bench import BenchEnv, Figure
from bench.credits import drop_schema, fresh_schema, prefill
from infra.harness import ROOT, ServiceProcess


async def drain(env: BenchEnv, prefix: str, n: int, processes: int) -> float:
    schema = await fresh_schema(env.database_url)
    group = "bench-scale-" + uuid.uuid4().hex[:8]
    base = {
        "KAFKA_BOOTSTRAP_SERVERS": env.kafka_bootstrap,
        "DATABASE_URL": env.database_url,
        "DATABASE_SCHEMA": schema,
        "TOPIC_PREFIX": prefix,
        "CONSUMER_GROUP": group,
        "LOG_LEVEL": "WARNING",
    }
    conn = await asyncpg.connect(env.database_url, server_settings={"search_path": schema})
    procs = [
        ServiceProcess(
            f"bench-scale-{i}", "services.credits", {**base, "CREDITS_INSTANCE": f"scale-{i}"}, ROOT / ".run"
        )
        for i in range(processes)
    ]
    for p in procs:
        p.env.pop("CONSUMER_INSTANCE_ID", None)
        p.launch()
    try:
        count = 0
        while count == 0:
            count = await conn.fetchval("SELECT count(*) FROM ledger_entries")
            await asyncio.sleep(0.01)
        # Timed from the first commit seen, so the entries it had already written are not counted: a
        # first batch of thousands would otherwise be counted as if written in no time.
        t0, first = time.perf_counter(), count
        deadline = time.monotonic() + 600
        while count < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} of {n} decided in 600 s")
            await asyncio.sleep(0.05)
            count = await conn.fetchval("SELECT count(*) FROM ledger_entries")
        return (count - first) / (time.perf_counter() - t0)
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop, 30) for p in procs))
        await conn.close()
        await drop_schema(env.database_url, schema)


async def run(env: BenchEnv) -> list[Figure]:
    n = 20_000 if env.quick else 100_000
    prefix = f"bench-credits-{n}."  # the same pre-filled topic as bench/credits.py
    await prefill(env.kafka_bootstrap, prefix + "model_call_completed", n)
    one = await drain(env, prefix, n, 1)
    two = await drain(env, prefix, n, 2)
    return [
        Figure(
            "credits scale-out", f"throughput, 2 processes, {n:,} pre-filled events", two, "events/s", "1 process", one
        )
    ]
