"""Resume after a crash: SIGKILL the credit service under a steady stream of events, start it again at
once (as `make run`'s supervisor does), and time from the kill to the next debit committed to the
ledger. Figure: the static member (CREDITS_INSTANCE set: the restarted process takes its partitions
back without a rebalance). Baseline in the same run: a dynamic member (no instance name), whose
successor waits for the dead member's session (10 s) to time out before the group rebalances.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaProducer

from bench import BenchEnv, Figure, percentile
from bench.credits import drop_schema, event, fresh_schema
from infra.harness import ROOT, ServiceProcess
from infra.topics import ensure_topics, wait_for_broker
from schemas.topics import MODEL_CALL_COMPLETED, topic_specs

RATE = 200  # events/s, steady


async def feed(bootstrap: str, topic: str, stop: asyncio.Event) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        i = 0
        while not stop.is_set():
            for _ in range(RATE // 20):
                e = event(i)
                await producer.send(topic, e.to_json(), key=e.user_id.encode())
                i += 1
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()


async def debits(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM ledger_entries WHERE decision = 'debited'")


async def wait_for_debit_beyond(conn: asyncpg.Connection, seen: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while await debits(conn) <= seen:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no debit beyond {seen} in {timeout_s} s")
        await asyncio.sleep(0.02)


async def resume_times(env: BenchEnv, kills: int, instance: str | None, log: Path) -> list[float]:
    prefix = f"bench-resume-{uuid.uuid4().hex[:8]}."
    admin = await wait_for_broker(env.kafka_bootstrap, 60)
    try:
        await ensure_topics(admin, topic_specs(prefix=prefix))
    finally:
        await admin.close()
    schema = await fresh_schema(env.database_url)
    service = ServiceProcess(
        log.stem,
        "services.credits",
        {
            "KAFKA_BOOTSTRAP_SERVERS": env.kafka_bootstrap,
            "DATABASE_URL": env.database_url,
            "DATABASE_SCHEMA": schema,
            "TOPIC_PREFIX": prefix,
            "LOG_LEVEL": "INFO",  # the log shows the import time
        },
        log.parent,
    )
    service.env.pop("CONSUMER_INSTANCE_ID", None)
    service.env.pop("CREDITS_INSTANCE", None)
    if instance:
        service.env["CREDITS_INSTANCE"] = instance
    conn = await asyncpg.connect(env.database_url, server_settings={"search_path": schema})
    stop = asyncio.Event()
    feeder = asyncio.create_task(feed(env.kafka_bootstrap, prefix + MODEL_CALL_COMPLETED, stop))
    service.launch()
    times = []
    try:
        await wait_for_debit_beyond(conn, 0)
        rng = random.Random(14)
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(1.0, 4.0))  # a crash comes at no particular moment
            await wait_for_debit_beyond(conn, await debits(conn))
            t_kill = time.monotonic()
            await asyncio.to_thread(service.kill)  # SIGKILL, then reaped
            await asyncio.sleep(0.1)  # a commit the dead process had sent lands now, not as "resumed"
            seen = await debits(conn)
            service.launch()
            await wait_for_debit_beyond(conn, seen)
            times.append(time.monotonic() - t_kill)
    finally:
        await asyncio.to_thread(service.stop, 30)
        stop.set()
        await feeder
        await conn.close()
        await drop_schema(env.database_url, schema)
    return times


async def run(env: BenchEnv) -> list[Figure]:
    log = ROOT / ".run" / "bench-resume.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    static = await resume_times(env, 3 if env.quick else 7, "credits-bench-1", log)
    dynamic = await resume_times(env, 1 if env.quick else 2, None, log)
    print(
        f"resume after SIGKILL, static member: {[round(t, 2) for t in static]} s; "
        f"dynamic member: {[round(t, 2) for t in dynamic]} s",
        file=sys.stderr,
    )
    return [
        Figure(
            "credits resume",
            "SIGKILL to next committed debit, p50",
            percentile(static, 50),
            "s",
            "dynamic member (no instance name)",
            percentile(dynamic, 50),
            better="lower",
            target="<= 3 s",
        ),
        Figure(
            "credits resume",
            "SIGKILL to next committed debit, max",
            max(static),
            "s",
            "dynamic member (no instance name)",
            max(dynamic),
            better="lower",
        ),
    ]
