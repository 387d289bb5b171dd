"""Chat service overhead per model call, at a steady 200 requests/s.

Measured: `POST /chat` on the chat service (`python -m services.chat`, its own process) on the
platform path (JWT, settings read, balance asked of the credit service, outbox row written before and
completed after the call, relay to Kafka) and on the BYOK path (JWT, settings read, sealed-key cookie
opened, outbox), each calling the provider simulator (its own process, answering at once).
Baseline, same run and same load generator: the same chat completion sent straight to the simulator.
Overhead = chat latency - direct latency, at p50 and p99 (target: under 5 ms and under 20 ms).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

from bench import BenchEnv, Figure, percentile
from infra.topics import ensure_topics, wait_for_broker
from schemas.topics import topic_specs
from services.chat.harness import ServiceProcess
from services.chat.identity import mint_token
from services.provider_simulator.app import base_urls
from services.shared.db import migrate

NAME = "chat"
# A rate this 2-core machine (load generator included) can sustain, and the target rate, so the
# table shows the per-call overhead both with and without queueing.
RATES = (50.0, 200.0)
SECRET = "bench-chat-secret-0123456789abcdef"
PLATFORM_KEY = "sk-proj-valid-benchplatform000000000001"
USER_KEY = "gsk_valid" + "bench" * 5
USERS = 20


async def steady(rate: float, seconds: float, send) -> tuple[list[float], int]:
    """Latencies (ms) of `send(i)` started at a steady `rate` (open loop: a slow answer delays no start),
    and how many failed (an error or a timeout: counted, shown in the table, not hidden).

    Each request is started when its time comes (not all created up front), so the generator holds
    only the requests in flight.
    """
    n = int(rate * seconds)
    latencies: list[float] = []
    failures = 0
    tasks: set[asyncio.Task] = set()

    async def one(i: int) -> None:
        nonlocal failures
        start = time.perf_counter()
        try:
            ok = await send(i)
        except httpx.HTTPError:
            ok = False
        if ok:
            latencies.append((time.perf_counter() - start) * 1000)
        else:
            failures += 1

    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return latencies, failures


async def run(env: BenchEnv) -> list[Figure]:
    seconds = 5 if env.quick else 10
    warmup = 2 if env.quick else 3
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    schema = f"bench_chat_{uuid.uuid4().hex[:6]}"
    admin = await wait_for_broker(env.kafka_bootstrap, 60)
    await ensure_topics(admin, topic_specs(partitions=3, prefix=prefix))
    await migrate(env.database_url, schema)
    logs = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    sim = ServiceProcess("simulator", "services.provider_simulator", {}, logs)
    sim.env.update(SIM_PORT=str(sim.port), SIM_VALID_KEYS=PLATFORM_KEY)
    procs: list[ServiceProcess] = []
    try:
        procs.append(sim.start())
        common = {"KAFKA_BOOTSTRAP_SERVERS": env.kafka_bootstrap, "DATABASE_URL": env.database_url,
                  "DATABASE_SCHEMA": schema, "TOPIC_PREFIX": prefix, "AUTH_JWT_SECRET": SECRET,
                  "LOG_LEVEL": "WARNING", **base_urls(sim.url)}
        credits = ServiceProcess("credits", "services.credits", common, logs)
        procs.append(credits.start())
        validation = ServiceProcess("validation", "services.validation", common, logs)
        procs.append(validation.start())
        chat = ServiceProcess("chat", "services.chat", {**common, "CREDITS_URL": credits.url, "COOKIE_SECURE": "false",
                                                        "GROQ_API_KEY": PLATFORM_KEY}, logs)
        procs.append(chat.start())
        return await measure(chat, credits, sim, seconds, warmup)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(logs, ignore_errors=True)
        await admin.delete_topics([s.name for s in topic_specs(prefix=prefix)])
        await admin.close()
        conn = await asyncpg.connect(env.database_url)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


async def measure(chat: ServiceProcess, credits: ServiceProcess, sim: ServiceProcess, seconds: float,
                  warmup: float) -> list[Figure]:
    # httpcore's pool work grows with its size: enough connections for the rate, no more.
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    admin = mint_token(SECRET, "bench-admin", role="admin", ttl_s=3600)
    tokens = {f"bench-user-{i}": mint_token(SECRET, f"bench-user-{i}", ttl_s=3600) for i in range(USERS)}
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        cookies: dict[str, str] = {}
        for user, token in tokens.items():
            for n in range(12):  # enough credits for every platform call of the run (llama3-8b-8192: 1 each)
                r = await http.post(f"{credits.url}/api/admin/grants", headers={"Authorization": f"Bearer {admin}"},
                                    json={"grant_key": f"{user}:{n}", "user_id": user, "plan": "standard"})
                r.raise_for_status()
            r = await http.post(f"{chat.url}/settings/model", headers={"Authorization": f"Bearer {token}"},
                                json={"provider": "groq", "model": "llama3-8b-8192", "use_own_key": True, "api_key": USER_KEY})
            r.raise_for_status()
            cookies[user] = r.cookies["byok_key"]
        users = list(tokens)

        direct_url = base_urls(sim.url)["GROQ_BASE_URL"] + "/openai/v1/chat/completions"
        direct_body = {"model": "llama3-8b-8192", "max_tokens": 1024,
                       "messages": [{"role": "system", "content": "You are a helpful data-analysis assistant."},
                                    {"role": "user", "content": "hello"}]}

        async def direct(i: int) -> bool:
            r = await phase.post(direct_url, json=direct_body, headers={"Authorization": f"Bearer {PLATFORM_KEY}"})
            return r.status_code == 200

        def chat_call(byok: bool):
            async def send(i: int) -> bool:
                user = users[i % len(users)]
                headers = {"Authorization": f"Bearer {tokens[user]}"}
                if byok:
                    headers["Cookie"] = f"byok_key={cookies[user]}"
                r = await phase.post(f"{chat.url}/chat", json={"feature": "chat", "message": "hello"}, headers=headers)
                return r.status_code == 200 and r.json()["key_source"] == ("byok" if byok else "platform")
            return send

        async def switch(byok: bool) -> None:
            for user in users:
                body = {"provider": "groq", "model": "llama3-8b-8192", "use_own_key": byok}
                r = await http.post(f"{chat.url}/settings/model", json=body,
                                    headers={"Authorization": f"Bearer {tokens[user]}", "Cookie": f"byok_key={cookies[user]}"})
                r.raise_for_status()

        results: dict[tuple[float, str], tuple[list[float], int]] = {}
        phase: httpx.AsyncClient
        for rate in RATES:
            for name, send, byok in [("direct", direct, None), ("byok", chat_call(True), True),
                                     ("platform", chat_call(False), False)]:
                if byok is not None:
                    await switch(byok)
                # A fresh client per phase: no connection left idle past the server's keep-alive timeout.
                async with httpx.AsyncClient(limits=limits, timeout=60) as phase:
                    await steady(rate, warmup, send)  # warm connections and caches
                    results[rate, name] = await steady(rate, seconds, send)
    return figures_of(results)


def figures_of(results: dict[tuple[float, str], tuple[list[float], int]]) -> list[Figure]:
    figures = []
    for rate, path in [(r, p) for r in RATES for p in ("platform", "byok")]:
        (direct, direct_failed), (chat, failed) = results[rate, "direct"], results[rate, path]
        d50, d99 = percentile(direct, 50), percentile(direct, 99)
        p50, p99 = percentile(chat, 50), percentile(chat, 99)
        label = f"{path} path at {rate:.0f} req/s"
        figures += [
            Figure(NAME, f"{label}: latency p50", p50, "ms", "simulator direct p50", d50, "lower"),
            Figure(NAME, f"{label}: latency p99", p99, "ms", "simulator direct p99", d99, "lower"),
            Figure(NAME, f"{label}: overhead p50 (chat - direct)", p50 - d50, "ms", "", None, "lower", "< 5 ms"),
            Figure(NAME, f"{label}: overhead p99 (chat - direct)", p99 - d99, "ms", "", None, "lower", "< 20 ms"),
            Figure(NAME, f"{label}: failed requests", failed, "", "simulator direct failed", direct_failed, "lower", "0"),
        ]
    return figures
