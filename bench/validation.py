"""Key-check round trip over the real broker, against a direct in-process check of the same key.

Measured: `KeyCheckRequester.check` -> key_check_requests -> the worker (`python -m services.validation`,
its own process) -> the provider simulator (its own process, answering at once) -> key_check_replies.
Baseline, same run: `KeyChecker.check` called in this process against the same simulator, i.e. the
same provider call without Kafka. The worker's cache is off (TTL 0) so both make one provider call per
check and the ratio shows what request/reply costs.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from bench import BenchEnv, Figure, percentile
from infra.topics import ensure_topics, wait_for_broker
from schemas.events import KeyCheckStatus, Provider
from schemas.topics import topic_specs
from services.chat.key_check_client import KeyCheckRequester
from services.provider_simulator.app import base_urls
from services.shared.settings import CommonSettings
from services.validation.checks import KeyChecker, make_http_client
from services.validation.settings import ValidationSettings

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-proj-valid-bench0000000000000000"
NAME = "validation"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
            try:
                if (await client.get(url, timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


async def _timed(check) -> float:
    started = time.perf_counter()
    status = await check()
    elapsed = (time.perf_counter() - started) * 1000
    if status is not KeyCheckStatus.VALID:
        raise RuntimeError(f"benchmark check answered {status}")
    return elapsed


async def _sequential(check, n: int) -> list[float]:
    return [await _timed(check) for _ in range(n)]


async def _concurrent(check, width: int, rounds: int) -> list[float]:
    samples: list[float] = []
    for _ in range(rounds):
        samples += await asyncio.gather(*(_timed(check) for _ in range(width)))
    return samples


def _figures(label: str, measured: list[float], baseline: list[float], targets: dict[int, str]) -> list[Figure]:
    return [
        Figure(
            NAME,
            f"key-check round trip p{p}, {label}",
            percentile(measured, p),
            "ms",
            f"direct in-process check p{p}",
            percentile(baseline, p),
            better="lower",
            target=targets.get(p, ""),
        )
        for p in (50, 99)
    ]


async def run(env: BenchEnv) -> list[Figure]:
    n_seq, rounds, width = (60, 3, 50) if env.quick else (400, 10, 50)
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    admin = await wait_for_broker(env.kafka_bootstrap, 60)
    await ensure_topics(admin, topic_specs(partitions=6, prefix=prefix))
    sim_port, worker_port = _free_port(), _free_port()
    sim_root = f"http://127.0.0.1:{sim_port}"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "services.provider_simulator", "--port", str(sim_port)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        await _wait_http(f"{sim_root}/healthz", procs[-1])
        worker_env = {
            "BYOK_ENV": "development",
            **os.environ,
            **base_urls(sim_root),
            "KAFKA_BOOTSTRAP_SERVERS": env.kafka_bootstrap,
            "TOPIC_PREFIX": prefix,
            "HTTP_PORT": str(worker_port),
            "CACHE_TTL_S": "0",
            "USER_CHECKS_PER_MINUTE": "1000000",
            "LOG_LEVEL": "WARNING",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "services.validation"],
                cwd=ROOT,
                env=worker_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        await _wait_http(f"http://127.0.0.1:{worker_port}/healthz", procs[-1])

        settings = ValidationSettings(**{k.lower(): v for k, v in base_urls(sim_root).items()})
        async with make_http_client(5, 2) as http:
            checker = KeyChecker(settings, http)

            async def direct():
                return (await checker.check(Provider.OPENAI, KEY)).status

            common = CommonSettings(kafka_bootstrap_servers=env.kafka_bootstrap, topic_prefix=prefix)
            async with KeyCheckRequester(common, timeout_s=30) as requester:

                async def over_kafka():
                    return (await requester.check(f"bench-{uuid.uuid4().hex[:6]}", Provider.OPENAI, KEY)).status

                # Warm both paths (connections, group assignment, JIT-free but cache-warm Python).
                await _sequential(over_kafka, 30)
                await _sequential(direct, 30)
                seq_kafka = await _sequential(over_kafka, n_seq)
                seq_direct = await _sequential(direct, n_seq)
                con_kafka = await _concurrent(over_kafka, width, rounds)
                con_direct = await _concurrent(direct, width, rounds)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            await admin.delete_topics([s.name for s in topic_specs(prefix=prefix)])
        finally:
            await admin.close()
    return _figures("sequential", seq_kafka, seq_direct, {50: "< 10 ms", 99: "< 50 ms"}) + _figures(
        f"{width} concurrent", con_kafka, con_direct, {}
    )
