"""The OpenAI-compatible gateway (issue 20): what `POST /v1/chat/completions` on the chat adds over the
provider itself, plain and streamed, beside the LiteLLM proxy doing the same job in front of the same
simulator.

Measured, at bench/chat.py's rates (100 and 200 calls/s) and at 25 calls/s (`RATES`, open loop), one OpenAI `gpt-4o-mini` chat
completion per call (`{"model", "messages": [user "hello"]}`; streamed: `stream: true` with
`stream_options.include_usage`):

- through the chat's gateway on the platform path (the user's token; hold, call row, outbox, the
  platform's key) and on the BYOK path (`X-Provider-Key`: the user's key for this call, no hold);
- through the LiteLLM proxy (`litellm --config`), when one is installed: one `model_list` entry
  `openai/gpt-4o-mini` with `api_base` the simulator's OpenAI URL and the same platform key, a master
  key, no database, its access log off as the chat's is;
- through a bare pass-through (`bench/passthrough.py`: uvicorn and one pooled aiohttp session, no auth,
  no outbox): the bound of the chat's own CPU per call (issue 22: at most 2x for BYOK, 2.5x for a
  platform call with its hold);
- baseline for each, measured right before it (so a load that comes and goes on this shared machine
  hits both alike): the same request straight to the simulator's OpenAI route.

Figures: latency (plain: to the whole answer; streamed: TTFT, to the first content chunk) at p50 and
p99 from each call's scheduled send time; overhead = through - direct at p50 and p99; the serving
process's CPU per call (chat, or LiteLLM's proxy) read from /proc over the measured window, divided by
the calls scheduled in it: it includes the process's idle work (timers, polling), which weighs most at
the lowest rate, and a process that cannot keep up shows less than it would need; failures.
`--quick`: 25 and 100 calls/s, 5 s each.
On our paths also the billing pipeline's CPU per call: the credit service (with its relay child), Kafka
and PostgreSQL, read from /proc the same way (target: at most 1 ms), each beside what the same
processes spend with no call at all, and the floor under it: Kafka and PostgreSQL with no client, read
before any service starts.
Then our overhead p50 as a ratio of LiteLLM's (target: at most 0.5), our CPU per call against its, and
chat plus billing pipeline against it (target: at most 0.5).

The LiteLLM proxy is not part of the lock (its `proxy` extra pins versions the project does not use,
and at the locked LiteLLM version it needs a package PyPI does not have): install it apart, e.g.
`python -m venv /tmp/litellm-proxy && /tmp/litellm-proxy/bin/pip install 'litellm[proxy]'`, and point
`LITELLM_PROXY` at its `litellm` executable (default: `.venv/bin/litellm`). It runs offline with
`LITELLM_LOCAL_MODEL_COST_MAP=True` (and the other `LITELLM_LOCAL_*` switches) and no `DATABASE_URL`.
When it is missing or does not start, the table says why and the gateway's figures stand alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

from bench import BenchEnv, Figure, percentile
from bench.cpu import billing_sources, idle_rates, infra_sources
from bench.loadgen import LeanClient
from bench.stream import Phase, Sse, SseClient, Timing, open_loop
from infra.harness import ROOT, ServiceProcess, free_port
from infra.topics import ensure_topics, wait_for_broker
from schemas.topics import topic_specs
from services.chat.identity import mint_token
from services.provider_simulator.app import base_urls
from services.shared.db import migrate

NAME = "gateway"
# bench/chat.py's rates (its admission-holds rate and its main rate), and a low one that no path here
# should need to queue at, so its overhead is the way through, not a queue.
RATES = (25.0, 50.0, 100.0, 200.0)
IDLE_S = 5.0  # the billing pipeline's CPU with no call at all, measured once before the phases
MODEL = "gpt-4o-mini"
SECRET = "bench-gateway-secret-0123456789abcdef"
PLATFORM_KEY = "sk-proj-valid-benchgateway0000000000001"
OWN_KEY = "sk-proj-valid-benchgatewayown000000000001"
MASTER_KEY = "sk-bench-litellm-master-0001"
USERS = 20
GRANTS = 6  # 500 credits each per user: enough for every platform call of a full run at 3 credits
MESSAGES = [{"role": "user", "content": "hello"}]
# LiteLLM offline: its model cost map, blog posts and policy templates from its own copies, no
# Hugging Face hub; and no DATABASE_URL, so the proxy runs without a database.
LITELLM_OFFLINE = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "HF_HUB_OFFLINE": "1",
    "LITELLM_LOG": "ERROR",
}
QUIET_LOGS = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"uvicorn.access": {"level": "WARNING"}, "uvicorn.error": {"level": "WARNING"}},
}


class LiteLLMProxy:
    """The LiteLLM proxy as a process on a free port, in front of `openai_base` with `key`."""

    def __init__(self, executable: str, openai_base: str, key: str, logs: Path):
        self.executable, self.port, self.logs = executable, free_port(), logs
        self.log_path = logs / "litellm-proxy.log"
        self.config = logs / "litellm-config.json"  # JSON is YAML: no YAML writer needed
        self.config.write_text(
            json.dumps(
                {
                    "model_list": [
                        {
                            "model_name": MODEL,
                            "litellm_params": {"model": f"openai/{MODEL}", "api_base": openai_base, "api_key": key},
                        }
                    ],
                    "litellm_settings": {"telemetry": False},
                    "general_settings": {"master_key": MASTER_KEY},
                }
            )
        )
        (logs / "litellm-logging.json").write_text(json.dumps(QUIET_LOGS))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180) -> str | None:
        """Start it and wait until it answers a completion; None, or why it could not be measured."""
        if not Path(self.executable).exists():
            return f"no LiteLLM proxy at {self.executable} (set LITELLM_PROXY to a `litellm` with the proxy extra)"
        keep = {k: v for k in ("PATH", "HOME", "LANG", "TMPDIR") if (v := os.environ.get(k))}
        argv = [self.executable, "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--num_workers", "1", "--log_config", str(self.logs / "litellm-logging.json")]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env={**keep, **LITELLM_OFFLINE}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"the LiteLLM proxy exited with {self.proc.returncode}: {self.tail()}"
            try:
                r = httpx.post(
                    self.url + "/v1/chat/completions",
                    json={"model": MODEL, "messages": MESSAGES},
                    headers={"Authorization": f"Bearer {MASTER_KEY}"},
                    timeout=10,
                )
                if r.status_code == 200:
                    return None
                return f"the LiteLLM proxy answered {r.status_code}: {r.text[:300]}"
            except httpx.HTTPError:
                time.sleep(0.5)
        return f"the LiteLLM proxy did not answer in {timeout_s:.0f} s: {self.tail()}"

    def tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(line for line in text.strip().splitlines()[-4:])[-400:]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def run(env: BenchEnv) -> list[Figure]:
    seconds = 5 if env.quick else 10
    warmup = 2 if env.quick else 3
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    schema = f"bench_gateway_{uuid.uuid4().hex[:6]}"
    admin = await wait_for_broker(env.kafka_bootstrap, 60)
    await ensure_topics(admin, topic_specs(partitions=3, prefix=prefix))
    await migrate(env.database_url, schema)
    logs = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    sim = ServiceProcess("simulator", "services.provider_simulator", {}, logs)
    sim.env.update(SIM_PORT=str(sim.port), SIM_VALID_KEYS=PLATFORM_KEY)
    procs: list[ServiceProcess] = []
    proxy: LiteLLMProxy | None = None
    try:
        # Kafka and PostgreSQL with no client at all: their own idle work, a floor under the pipeline's CPU
        # per call at a low rate.
        await asyncio.sleep(2)  # a broker `make bench` has just started is still settling
        floor = await idle_rates(infra_sources(), IDLE_S)
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
        chat = ServiceProcess(
            "chat",
            "services.chat",
            {**common, "CREDITS_URL": credits.url, "COOKIE_SECURE": "false", "OPENAI_API_KEY": PLATFORM_KEY},
            logs,
        )
        procs.append(chat.start())
        # The bound of the chat's own CPU per call: the same request through a bare pass-through.
        bare = ServiceProcess(
            "passthrough", "bench.passthrough", {"UPSTREAM": base_urls(sim.url)["OPENAI_BASE_URL"]}, logs
        )
        procs.append(bare.start())
        executable = os.environ.get("LITELLM_PROXY") or str(ROOT / ".venv/bin/litellm")
        proxy = LiteLLMProxy(executable, base_urls(sim.url)["OPENAI_BASE_URL"], PLATFORM_KEY, logs)
        why_not = await asyncio.to_thread(proxy.start)
        if why_not:
            print(f"bench/gateway.py: LiteLLM proxy not measured: {why_not}", flush=True)
        rates = (RATES[0], 100.0) if env.quick else RATES  # quick: the lowest rate and the holds' rate
        return await measure(
            chat, credits, sim, None if why_not else proxy, why_not, seconds, warmup, rates, bare=bare, floor=floor
        )
    finally:
        if proxy is not None:
            proxy.stop()
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(logs, ignore_errors=True)
        await admin.delete_topics([s.name for s in topic_specs(prefix=prefix)])
        await admin.close()
        conn = await asyncpg.connect(env.database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def measure(
    chat: ServiceProcess,
    credits: ServiceProcess,
    sim: ServiceProcess,
    proxy: LiteLLMProxy | None,
    why_not: str | None,
    seconds: float,
    warmup: float,
    rates: tuple[float, ...] = RATES,
    *,
    bare: ServiceProcess,
    floor: dict[str, float] | None = None,
) -> list[Figure]:
    admin = mint_token(SECRET, "bench-admin", role="admin", ttl_s=3600)
    tokens = [mint_token(SECRET, f"bench-gw-{i}", ttl_s=3600) for i in range(USERS)]
    async with httpx.AsyncClient(timeout=30) as http:  # set-up only; the load goes through LeanClient
        for i in range(USERS):
            for n in range(GRANTS):
                r = await http.post(
                    f"{credits.url}/api/admin/grants",
                    headers={"Authorization": f"Bearer {admin}"},
                    json={"grant_key": f"bench-gw-{i}:{n}", "user_id": f"bench-gw-{i}", "plan": "standard"},
                )
                r.raise_for_status()

    direct_path = urlsplit(base_urls(sim.url)["OPENAI_BASE_URL"]).path + "/chat/completions"

    def body(stream: bool) -> dict:
        # What providers/openai.py sends for the gateway's call (max_tokens: the gateway's default).
        out: dict = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1024}
        if stream:
            out.update(stream=True, stream_options={"include_usage": True})
        return out

    def requests(client: LeanClient, target: str, stream: bool) -> list[bytes]:
        """The request bytes of one target: direct (the simulator), platform or byok (our gateway),
        litellm (its proxy)."""
        if target == "direct":
            headers = {"Authorization": f"Bearer {PLATFORM_KEY}"}
            return [client.prepare("POST", direct_path, json_body=body(stream), headers=headers)]
        if target == "bare":
            headers = {"Authorization": f"Bearer {PLATFORM_KEY}"}
            return [client.prepare("POST", "/v1/chat/completions", json_body=body(stream), headers=headers)]
        if target == "litellm":
            headers = {"Authorization": f"Bearer {MASTER_KEY}"}
            return [client.prepare("POST", "/v1/chat/completions", json_body=body(stream), headers=headers)]
        raws = []
        for token in tokens:
            headers = {"Authorization": f"Bearer {token}"}
            if target == "byok":
                headers["X-Provider-Key"] = OWN_KEY
            raws.append(client.prepare("POST", "/v1/chat/completions", json_body=body(stream), headers=headers))
        return raws

    def good(target: str, answer: dict) -> bool:
        """A completed answer, on the key the path promises (our gateway's `billing` says which)."""
        if target in ("platform", "byok"):
            return (answer.get("billing") or {}).get("key_source") == target
        return True

    def plain_calls(client: LeanClient, target: str) -> Callable[[Timing], Awaitable[None]]:
        raws, count = requests(client, target, False), 0
        clock = asyncio.get_running_loop().time

        async def one(timing: Timing) -> None:
            nonlocal count
            count += 1
            answer = await client.send(raws[count % len(raws)])
            if answer.status == 200:
                done = answer.json()
                if done["choices"][0]["message"]["content"] and good(target, done):
                    timing.ended = clock()

        return one

    def stream_calls(client: SseClient, target: str) -> Callable[[Timing], Awaitable[None]]:
        raws, count = requests(client, target, True), 0

        async def one(timing: Timing) -> None:
            nonlocal count
            count += 1
            seen = {"finish": False, "usage": False}

            def on_event(event: Sse) -> None:
                if event.data == b"[DONE]":
                    if seen["finish"] and seen["usage"]:
                        timing.ended = event.at
                    return
                chunk = json.loads(event.data)
                choices = chunk.get("choices")
                if choices and choices[0]["delta"].get("content"):
                    timing.piece(event.at)
                if choices and choices[0].get("finish_reason"):
                    seen["finish"] = target in ("direct", "bare", "litellm") or good(target, chunk)
                if chunk.get("usage"):
                    seen["usage"] = True

            if await client.stream(raws[count % len(raws)], on_event) != 200:
                timing.ended = None

        return one

    pids = {"direct": sim.proc.pid, "platform": chat.proc.pid, "byok": chat.proc.pid}
    billing = billing_sources(credits.proc.pid)
    idle_per_s = await idle_rates(billing, IDLE_S)
    if proxy is not None:
        pids["litellm"] = proxy.proc.pid
    pids["bare"] = bare.proc.pid
    targets = [t for t in ("platform", "byok", "bare", "litellm") if t in pids]
    results: dict[str, Phase] = {}
    for rate in rates:
        for mode in ("plain", "stream"):
            for target in targets:
                # The baseline right before each target; a fresh client per phase (no connection left
                # idle past a server's keep-alive timeout).
                origin = {"litellm": proxy.url if proxy else "", "bare": bare.url}.get(target, chat.url)
                for name, url in (("direct", sim.url), (target, origin)):
                    async with (LeanClient if mode == "plain" else SseClient)(url) as client:
                        calls = plain_calls(client, name) if mode == "plain" else stream_calls(client, name)
                        results[f"{rate:.0f}/{mode}/{target}/{name}"] = await open_loop(
                            rate,
                            warmup,
                            seconds,
                            calls,
                            pids[name],
                            also=billing if name in ("platform", "byok") else None,
                        )
    return [f for rate in rates for f in figures_of(results, rate, targets, why_not, idle_per_s, floor)]


def figures_of(
    results: dict[str, Phase],
    rate: float,
    targets: list[str],
    why_not: str | None,
    idle_per_s: dict[str, float] | None = None,
    floor: dict[str, float] | None = None,
) -> list[Figure]:
    figures: list[Figure] = []
    idle_per_s = idle_per_s or {}
    if floor:
        figures.append(
            Figure(
                NAME,
                f"at {rate:.0f}/s: {' + '.join(floor)} alone, no client at all, CPU per call's worth of time",
                sum(floor.values()) * 1000 / rate,
                "ms",
                target="the floor under the billing pipeline's CPU per call",
            )
        )
    overhead: dict[tuple[str, str], float] = {}
    cpu: dict[tuple[str, str], float] = {}
    what = {
        "platform": "gateway platform path",
        "byok": "gateway BYOK path",
        "bare": "bare pass-through",
        "litellm": "LiteLLM proxy",
    }
    for mode in ("plain", "stream"):
        latency = "latency" if mode == "plain" else "TTFT"
        for target in targets:
            direct, through = (
                results[f"{rate:.0f}/{mode}/{target}/direct"],
                results[f"{rate:.0f}/{mode}/{target}/{target}"],
            )
            label = f"{mode} at {rate:.0f}/s, {what[target]}"
            figures.append(
                Figure(
                    NAME,
                    f"{label}: failed (of {through.planned})",
                    through.failures,
                    "",
                    "simulator direct failed",
                    direct.failures,
                    "lower",
                    "0",
                )
            )
            cpu[mode, target] = through.cpu_ms
            if not (through.ttft and direct.ttft):
                continue
            t50, d50 = percentile(through.ttft, 50), percentile(direct.ttft, 50)
            t99, d99 = percentile(through.ttft, 99), percentile(direct.ttft, 99)
            overhead[mode, target] = t50 - d50
            process = {"litellm": "LiteLLM process", "bare": "pass-through process"}.get(target, "chat process")
            figures += [
                Figure(NAME, f"{label}: {latency} p50", t50, "ms", "simulator direct p50", d50, "lower"),
                Figure(NAME, f"{label}: {latency} p99", t99, "ms", "simulator direct p99", d99, "lower"),
                Figure(NAME, f"{label}: overhead p50 (through - direct)", t50 - d50, "ms", "", None, "lower"),
                Figure(NAME, f"{label}: overhead p99 (through - direct)", t99 - d99, "ms", "", None, "lower"),
                Figure(
                    NAME,
                    f"{label}: {process} CPU per call",
                    through.cpu_ms,
                    "ms",
                    "simulator CPU per call",
                    direct.cpu_ms,
                    "lower",
                ),
                *billing_figures(label, through, rate, idle_per_s),
                Figure(
                    NAME,
                    f"{label}: generator late starts (> 1 ms)",
                    through.late_starts,
                    "",
                    "direct",
                    direct.late_starts,
                    "lower",
                ),
            ]
    for mode in ("plain", "stream"):
        for path, bound in (("byok", 2.0), ("platform", 2.5)):
            if (mode, path) in cpu and (mode, "bare") in cpu:
                figures.append(
                    Figure(
                        NAME,
                        f"{mode} at {rate:.0f}/s, gateway {path} path: chat process CPU per call vs a bare pass-through",
                        cpu[mode, path],
                        "ms",
                        "bare pass-through (uvicorn + aiohttp) CPU per call",
                        cpu[mode, "bare"],
                        "lower",
                        f"<= {bound:.2f}x",
                    )
                )
    if why_not:
        if rate == RATES[0]:  # said once
            figures.append(Figure(NAME, f"LiteLLM proxy not measured: {why_not[:160]}", float("nan"), ""))
        return figures
    for mode in ("plain", "stream"):
        kind = "latency" if mode == "plain" else "TTFT"
        for path in ("platform", "byok"):
            label = f"{mode} at {rate:.0f}/s, gateway {path} path vs LiteLLM proxy"
            if (mode, path) in overhead and (mode, "litellm") in overhead:
                figures.append(
                    Figure(
                        NAME,
                        f"{label}: {kind} overhead p50",
                        overhead[mode, path],
                        "ms",
                        "LiteLLM proxy overhead p50",
                        overhead[mode, "litellm"],
                        "lower",
                        "<= 0.50x",
                    )
                )
            figures.append(
                Figure(
                    NAME,
                    f"{label}: CPU per call",
                    cpu[mode, path],
                    "ms",
                    "LiteLLM proxy CPU per call",
                    cpu[mode, "litellm"],
                    "lower",
                )
            )
            through = results[f"{rate:.0f}/{mode}/{path}/{path}"]
            if through.also_ms:
                figures.append(
                    Figure(
                        NAME,
                        f"{label}: chat + billing pipeline CPU per call ({' + '.join(through.also_ms)})",
                        cpu[mode, path] + sum(through.also_ms.values()),
                        "ms",
                        "LiteLLM proxy CPU per call",
                        cpu[mode, "litellm"],
                        "lower",
                        "<= 0.50x",
                    )
                )
    return figures


def billing_figures(label: str, through: Phase, rate: float, idle_per_s: dict[str, float]) -> list[Figure]:
    """The billing pipeline's CPU per call of one phase (credit service with its relay child, Kafka,
    PostgreSQL), each beside what the same processes spend per call's worth of time with no call at all."""
    if not through.also_ms:
        return []
    idle = {name: idle_per_s.get(name, 0.0) * 1000 / rate for name in through.also_ms}  # ms per call at this rate
    figures = [
        Figure(
            NAME,
            f"{label}: billing pipeline CPU per call ({' + '.join(through.also_ms)}; the chat's own queries included)",
            sum(through.also_ms.values()),
            "ms",
            "the same, idle (no call)",
            sum(idle.values()),
            "lower",
            "<= 1 ms",
        )
    ]
    figures += [
        Figure(NAME, f"{label}: {name} CPU per call", ms, "ms", f"{name} idle", idle[name], "lower")
        for name, ms in through.also_ms.items()
    ]
    return figures
