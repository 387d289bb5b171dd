"""Chat service overhead per model call, at a steady 200 requests/s (issue #5).

Measured: `POST /chat` on the chat service (`python -m services.chat`, its own process) on the
platform path (JWT, settings read, call row and pending event written, admission hold placed with the
credit service, outbox row completed after the call, relay to Kafka) and on the BYOK path (JWT, settings
read, sealed-key cookie opened, call row and outbox, no hold), each calling the provider simulator (its own process, answering at once).
Baseline, same run and same load generator, measured right before each path: the same chat
completion sent straight to the simulator. Overhead = chat latency - direct latency, at p50 and p99
(target: under 5 ms and under 20 ms).

Admission holds: no setting turns them off (a switch that let production overspend is gone), so
their baseline is the BYOK path of the same chat process at the same rate (100 req/s, back to back,
BYOK first), which places no hold: platform minus BYOK at p50 is what the hold adds (target: at most
1 ms), plus whatever else differs between the two paths (BYOK opens the sealed-key cookie, for one),
so it bounds the hold's cost rather than isolating it.
The hold round trip itself (POST /api/holds + DELETE) is measured straight against the credit service.

The load is open loop at a fixed rate (`bench.loadgen.steady`): each latency runs from the request's
scheduled send time, so queueing shows; failed or unanswered requests are counted and reported.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

from bench import BenchEnv, Figure, percentile
from bench.cpu import ProcessCpu, Tree
from bench.loadgen import LeanClient, Run, steady
from infra.harness import ServiceProcess
from infra.topics import ensure_topics, wait_for_broker
from schemas.topics import topic_specs
from services.chat.identity import mint_token
from services.provider_simulator.app import base_urls
from services.shared.db import migrate
from services.shared.serving import raise_open_files

NAME = "chat"
RATE = 200.0  # the rate
HOLD_RATE = 100.0  # the admission-holds issue's rate
SECRET = "bench-chat-secret-0123456789abcdef"
PLATFORM_KEY = "sk-proj-valid-benchplatform000000000001"
USER_KEY = "gsk_valid" + "bench" * 5
USERS = 20
BURST = 1500  # platform calls sent at once: each waits for its hold, none is refused for waiting (issue 22)


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
        common = {
            "KAFKA_BOOTSTRAP_SERVERS": env.kafka_bootstrap,
            "DATABASE_URL": env.database_url,
            "DATABASE_SCHEMA": schema,
            "TOPIC_PREFIX": prefix,
            "AUTH_JWT_SECRET": SECRET,
            "LOG_LEVEL": "WARNING",
            **base_urls(sim.url),
        }
        credits = ServiceProcess("credits", "services.credits", common, logs)
        procs.append(credits.start())
        validation = ServiceProcess("validation", "services.validation", common, logs)
        procs.append(validation.start())
        chat = ServiceProcess(
            "chat",
            "services.chat",
            {
                **common,
                "CREDITS_URL": credits.url,
                "COOKIE_SECURE": "false",
                "GROQ_API_KEY": PLATFORM_KEY,
                # The burst's 1,500 calls come from one client (as from a load balancer): the per-client and
                # in-flight limits are not what the burst measures.
                "HTTP_MAX_IN_FLIGHT": str(BURST * 2),
                "HTTP_MAX_CONNECTIONS_PER_CLIENT": str(BURST * 2),
            },
            logs,
        )
        procs.append(chat.start())
        return await measure(chat, credits, sim, seconds, warmup, holds=True)
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


async def measure(
    chat: ServiceProcess,
    credits: ServiceProcess,
    sim: ServiceProcess,
    seconds: float,
    warmup: float,
    holds: bool = False,
) -> list[Figure]:
    admin = mint_token(SECRET, "bench-admin", role="admin", ttl_s=3600)
    tokens = {f"bench-user-{i}": mint_token(SECRET, f"bench-user-{i}", ttl_s=3600) for i in range(USERS)}
    async with httpx.AsyncClient(timeout=30) as http:  # set-up only; the load goes through LeanClient
        cookies: dict[str, str] = {}
        for user, token in tokens.items():
            for n in range(12):  # enough credits for every platform call of the run (llama3-8b-8192: 1 each)
                r = await http.post(
                    f"{credits.url}/api/admin/grants",
                    headers={"Authorization": f"Bearer {admin}"},
                    json={"grant_key": f"{user}:{n}", "user_id": user, "plan": "standard"},
                )
                r.raise_for_status()
            r = await http.post(
                f"{chat.url}/settings/model",
                headers={"Authorization": f"Bearer {token}"},
                json={"provider": "groq", "model": "llama3-8b-8192", "use_own_key": True, "api_key": USER_KEY},
            )
            r.raise_for_status()
            cookies[user] = r.cookies["byok_key"]

        async def switch(byok: bool) -> None:
            for user in tokens:
                # Switching BYOK off revokes the user's keys, so switching on again checks the key anew.
                body = {"provider": "groq", "model": "llama3-8b-8192", "use_own_key": byok}
                if byok:
                    body["api_key"] = USER_KEY
                r = await http.post(
                    f"{chat.url}/settings/model",
                    json=body,
                    headers={"Authorization": f"Bearer {tokens[user]}", "Cookie": f"byok_key={cookies[user]}"},
                )
                r.raise_for_status()
                if byok:
                    cookies[user] = r.cookies["byok_key"]

        direct_path = urlsplit(base_urls(sim.url)["GROQ_BASE_URL"]).path + "/openai/v1/chat/completions"
        direct_body = {
            "model": "llama3-8b-8192",
            "max_tokens": 1024,
            "messages": [
                {"role": "system", "content": "You are a helpful data-analysis assistant."},
                {"role": "user", "content": "hello"},
            ],
        }

        def direct_calls(client: LeanClient):
            raw = client.prepare(
                "POST", direct_path, json_body=direct_body, headers={"Authorization": f"Bearer {PLATFORM_KEY}"}
            )

            async def send(i: int) -> bool:
                return (await client.send(raw)).status == 200

            return send

        def chat_calls(client: LeanClient, byok: bool):
            raws = []
            for user, token in tokens.items():
                headers = {"Authorization": f"Bearer {token}"}
                if byok:
                    headers["Cookie"] = f"byok_key={cookies[user]}"
                raws.append(
                    client.prepare("POST", "/chat", json_body={"feature": "chat", "message": "hello"}, headers=headers)
                )
            want = "byok" if byok else "platform"

            async def send(i: int) -> bool:
                answer = await client.send(raws[i % len(raws)])
                return answer.status == 200 and answer.json()["key_source"] == want

            return send

        def hold_calls(client: LeanClient):
            """One admission hold placed and released per call, straight at the credit service."""
            headers = {"Authorization": f"Bearer {tokens['bench-user-0']}"}

            async def send(i: int) -> bool:
                event_id = str(uuid.uuid4())
                placed = await client.send(
                    client.prepare(
                        "POST",
                        "/api/holds",
                        headers=headers,
                        json_body={
                            "event_id": event_id,
                            "feature": "chat",
                            "provider": "groq",
                            "model": "llama3-8b-8192",
                        },
                    )
                )
                released = await client.send(client.prepare("DELETE", f"/api/holds/{event_id}", headers=headers))
                return placed.status == 201 and released.status == 200

            return send

        results: dict[str, Run] = {}
        cpu: dict[str, tuple[float, float]] = {}  # phase -> CPU ms per call (chat process, credit service)
        if holds:
            # Holds: the platform path (a hold per call) against the BYOK path (none) of the same
            # process, back to back at the hold target's rate, and the hold round trip itself
            # (place + release) against the credit service.
            for name, byok in (("byok/no hold", True), ("platform/hold", False)):
                await switch(byok)
                async with LeanClient(chat.url) as client:
                    await steady(HOLD_RATE, warmup, chat_calls(client, byok))
                    with ProcessCpu(chat.proc.pid, Tree(credits.proc.pid)) as used:
                        results[name] = await steady(HOLD_RATE, seconds, chat_calls(client, byok))
                    cpu[name] = used.per_call(results[name].planned)
            async with LeanClient(credits.url) as client:
                await steady(HOLD_RATE, warmup, hold_calls(client))
                results["hold round trip"] = await steady(HOLD_RATE, seconds, hold_calls(client))
            await switch(False)
            async with LeanClient(chat.url) as client:
                results["burst"] = await burst(BURST, chat_calls(client, False))
        # Each path is measured right after its own baseline, so a load that comes and goes on this
        # shared machine hits both alike.
        for path in ("platform", "byok"):
            await switch(path == "byok")
            for name, origin in ((f"direct/{path}", sim.url), (path, chat.url)):
                # A fresh client per phase: no connection left idle past the server's keep-alive timeout.
                async with LeanClient(origin) as client:
                    send = direct_calls(client) if name.startswith("direct") else chat_calls(client, path == "byok")
                    await steady(RATE, warmup, send)  # warm connections and caches
                    with ProcessCpu(chat.proc.pid, Tree(credits.proc.pid)) as used:
                        results[name] = await steady(RATE, seconds, send)
                    cpu[name] = used.per_call(results[name].planned)
    return figures_of(results, cpu)


async def burst(n: int, send: Callable[[int], Awaitable[bool]]) -> Run:
    """`n` calls started at once (no pacing): how many were not answered well, and each good one's time."""
    raise_open_files(n + 1024)
    started = time.perf_counter()
    latencies: list[float] = []

    async def one(i: int) -> bool:
        try:
            ok = await asyncio.wait_for(send(i), 120)
        except Exception:
            return False
        if ok:
            latencies.append((time.perf_counter() - started) * 1000)
        return ok

    answers = await asyncio.gather(*(one(i) for i in range(n)))
    return Run(latencies, answers.count(False), n, 0)


def figures_of(results: dict[str, Run], cpu: dict[str, tuple[float, float]] | None = None) -> list[Figure]:
    figures = []
    cpu = cpu or {}
    # CPU per call does not depend on whether the process keeps up, so it compares runs that saturate.
    for name in ("platform/hold", "byok/no hold", "platform", "byok"):
        if name in cpu:
            chat_ms, credits_ms = cpu[name]
            label = f"{name} at {HOLD_RATE if '/' in name else RATE:.0f} req/s"
            figures.append(
                Figure(
                    NAME,
                    f"{label}: chat process CPU per call",
                    chat_ms,
                    "ms",
                    "credit service (with its relay child)",
                    credits_ms,
                    "lower",
                )
            )
    held, unheld, trip = results.get("platform/hold"), results.get("byok/no hold"), results.get("hold round trip")
    if held and unheld and held.latencies and unheld.latencies:
        label = f"at {HOLD_RATE:.0f} req/s, same process"
        h50, u50 = percentile(held.latencies, 50), percentile(unheld.latencies, 50)
        h99, u99 = percentile(held.latencies, 99), percentile(unheld.latencies, 99)
        figures += [
            Figure(
                NAME, f"platform path (hold) {label}: latency p50", h50, "ms", "BYOK path (no hold) p50", u50, "lower"
            ),
            Figure(
                NAME, f"platform path (hold) {label}: latency p99", h99, "ms", "BYOK path (no hold) p99", u99, "lower"
            ),
            Figure(
                NAME, f"{label}: platform - BYOK p50 (bounds the hold)", h50 - u50, "ms", "", None, "lower", "<= 1 ms"
            ),
            Figure(
                NAME,
                f"platform path (hold) {label}: failed requests (of {held.planned})",
                held.failures,
                "",
                "BYOK path failed",
                unheld.failures,
                "lower",
                "0",
            ),
        ]
    if "burst" in results:
        shot = results["burst"]
        label = f"{shot.planned:,} platform calls at once (a hold each)"
        figures.append(Figure(NAME, f"{label}: not answered 200", shot.failures, "", "", None, "lower", "0"))
        if shot.latencies:
            for q in (50, 99):
                figures.append(
                    Figure(NAME, f"{label}: latency p{q}", percentile(shot.latencies, q), "ms", better="lower")
                )
    if trip and trip.latencies:
        figures += [
            Figure(
                NAME,
                f"hold place + release round trip at {HOLD_RATE:.0f}/s: p50",
                percentile(trip.latencies, 50),
                "ms",
                "",
                None,
                "lower",
            ),
            Figure(
                NAME,
                f"hold place + release round trip at {HOLD_RATE:.0f}/s: p99",
                percentile(trip.latencies, 99),
                "ms",
                "",
                None,
                "lower",
            ),
        ]
    for path in ("platform", "byok"):
        direct, chat = results[f"direct/{path}"], results[path]
        label = f"{path} path at {RATE:.0f} req/s"
        if not chat.latencies or not direct.latencies:
            figures.append(
                Figure(
                    NAME,
                    f"{label}: failed requests",
                    chat.failures,
                    "",
                    "simulator direct failed",
                    direct.failures,
                    "lower",
                    "0",
                )
            )
            continue
        d50, d99 = percentile(direct.latencies, 50), percentile(direct.latencies, 99)
        p50, p99 = percentile(chat.latencies, 50), percentile(chat.latencies, 99)
        figures += [
            Figure(NAME, f"{label}: latency p50", p50, "ms", "simulator direct p50", d50, "lower"),
            Figure(NAME, f"{label}: latency p99", p99, "ms", "simulator direct p99", d99, "lower"),
            Figure(NAME, f"{label}: overhead p50 (chat - direct)", p50 - d50, "ms", "", None, "lower", "< 5 ms"),
            Figure(NAME, f"{label}: overhead p99 (chat - direct)", p99 - d99, "ms", "", None, "lower", "< 20 ms"),
            Figure(
                NAME,
                f"{label}: failed requests (of {chat.planned})",
                chat.failures,
                "",
                "simulator direct failed",
                direct.failures,
                "lower",
                "0",
            ),
            Figure(
                NAME,
                f"{label}: generator late starts (> 1 ms)",
                chat.late_starts,
                "",
                "simulator direct",
                direct.late_starts,
                "lower",
            ),
        ]
    return figures
