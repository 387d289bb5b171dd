"""Streamed chat (issue 19): time to first token and per-chunk latency through the chat, against the
simulator streaming the same completion directly, at 100 and at 200 streams in flight.

Measured: `POST /chat` with `"stream": true` on the chat service (its own process) on the BYOK path
(OpenAI `gpt-4o-mini`, the user's own key: JWT, settings read, sealed-key cookie opened, call row
and pending event written, then `providers.client.chat_stream` relayed as `delta` events, one `done`).
BYOK places no hold, so what is measured is the chat's own streaming (the hold's cost is measured by
`bench/chat.py`). Baseline, same run, measured right before: the same streamed OpenAI chat completion
(`stream: true`, `stream_options.include_usage`) sent straight to the simulator with the same key.

The simulator paces the stream: the key is registered as `stream_slow` with `CHUNKS` text pieces
`GAP_MS` apart (the first at once), so a stream lasts about `(CHUNKS - 1) * GAP_MS`.

- TTFT: from the request's scheduled send time to the first `delta` event (through the chat) or the
  first chunk with content (direct). Overhead = chat - direct at p50 and p99 (targets: under 3 ms and
  under 20 ms).
- Added latency per chunk: the gaps between successive text pieces of a stream, through the chat
  against direct, at p50 and p99 (each stream's gaps, all streams pooled; the simulator's pacing is
  the same for both, so the difference is what the chat adds to a chunk's way).
- Load: open loop (`bench.loadgen`'s rule: a slow answer delays no later start) at
  `N / stream length` streams per second, which keeps N in flight; the in-flight count is sampled
  and its mean printed. Streams scheduled in the first `warmup` seconds (the ramp up to N) are not
  counted; a stream that fails, ends without its end event or misses pieces is counted as failed.
- CPU: the chat process's CPU per streamed call against per non-streamed call of the same answer
  (a key that streams at once, same rate, back to back; target: streamed at most +20 %), read from
  /proc over the steady window (CPU seconds in the window / calls scheduled in it). Also the CPU per
  call of the paced streams above (`CHUNKS` pieces each), for what a longer stream costs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httptools
import httpx

from bench import BenchEnv, Figure, percentile
from bench.cpu import ProcessCpu, Source
from bench.loadgen import HttpFailed, LeanClient
from infra.harness import ServiceProcess
from infra.topics import ensure_topics, wait_for_broker
from schemas.topics import topic_specs
from services.chat.identity import mint_token
from services.provider_simulator.app import base_urls
from services.shared.db import migrate

NAME = "stream"
SECRET = "bench-stream-secret-0123456789abcdef"
MODEL = "gpt-4o-mini"
SLOW_KEY = "sk-proj-benchpaced-000000000000000001"  # registered as stream_slow: paced pieces
FAST_KEY = "sk-proj-valid-benchstreamfast0000000001"  # streams at once (one piece a word)
CHUNKS = 30
GAP_MS = 100
IN_FLIGHT = (100, 200)
CPU_RATE = 100.0  # streamed vs non-streamed calls per second, for the CPU comparison
USERS = 20
MESSAGE = "hello"


# --- a streaming HTTP/1.1 client: Server-Sent Events handed over as they arrive, each with the time
# its bytes were read ---


@dataclass
class Sse:
    name: str
    data: bytes
    at: float  # loop time when the bytes carrying it were read


class _SseConnection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; the body is cut into events as it comes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.on_event: Callable[[Sse], None] | None = None
        self.buffer = b""
        self.now = 0.0
        self.usable = True
        self.clock = asyncio.get_running_loop().time

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.now = self.clock()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpFailed(f"unparsable answer: {exc}"))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.usable = False
        self._fail(HttpFailed(f"connection lost: {exc or 'closed by the server'}"))

    def on_body(self, body: bytes) -> None:
        self.buffer += body
        while (end := self.buffer.find(b"\n\n")) >= 0:
            block, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            name, data = "message", []
            for line in block.split(b"\n"):
                if line.startswith(b"event:"):
                    name = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    data.append(line[5:].strip())
            if data and self.on_event is not None:
                self.on_event(Sse(name, b"\n".join(data), self.now))

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.usable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.parser.get_status_code())

    def _fail(self, exc: Exception) -> None:
        self.usable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    async def request(self, raw: bytes, on_event: Callable[[Sse], None]) -> int:
        if not self.usable or self.transport.is_closing():
            raise HttpFailed("connection closed")
        self.buffer, self.on_event = b"", on_event
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        try:
            return await self.waiter
        finally:
            self.waiter, self.on_event = None, None


class SseClient(LeanClient):
    """`LeanClient`'s pool and request bytes, with answers read as Server-Sent Events as they come."""

    async def stream(self, raw: bytes, on_event: Callable[[Sse], None]) -> int:
        """Send `raw`, call `on_event` for each event of the answer as it arrives; the status at the end."""
        connection = None
        while self._idle and connection is None:
            connection = self._idle.pop()
            if not connection.usable:
                self._all.discard(connection)
                connection = None
        if connection is None:
            loop = asyncio.get_running_loop()
            try:
                _, connection = await loop.create_connection(_SseConnection, self.host, self.port)
            except OSError as exc:
                raise HttpFailed(f"cannot connect: {exc}") from None
            self._all.add(connection)
        try:
            return await connection.request(raw, on_event)
        except BaseException:
            connection.usable = False
            raise
        finally:
            if connection.usable:
                self._idle.append(connection)
            else:
                self._all.discard(connection)
                connection.transport.close()


# --- one stream's timings, and an open-loop run of many ---


@dataclass
class Timing:
    scheduled: float
    pieces: list[float] = field(default_factory=list)  # arrival time of each text piece
    ended: float | None = None  # the end event (`done`, `[DONE]`, or a plain answer) arrived, good

    def piece(self, at: float) -> None:
        self.pieces.append(at)


@dataclass
class Phase:
    ttft: list[float]  # ms from the scheduled send to the first piece (plain calls: to the answer)
    gaps: list[float]  # ms between successive pieces of a stream
    failures: int
    planned: int  # calls scheduled in the measured window
    in_flight: float  # mean calls in flight over the window
    cpu_ms: float  # the watched process's CPU per call scheduled in the window
    late_starts: int
    also_ms: dict[str, float] = field(default_factory=dict)  # CPU per call of the other processes watched


async def open_loop(
    rate: float,
    warmup: float,
    seconds: float,
    one: Callable[[Timing], Awaitable[None]],
    pid: Source,
    *,
    pieces: int | None = None,
    drain_s: float = 60.0,
    also: Mapping[str, Source] | None = None,
) -> Phase:
    """Start `one(timing)` at a fixed `rate` for `warmup + seconds` (open loop). Calls scheduled in the
    last `seconds` are counted: good ones with their timings, others as failures (an exception, no end
    event, another number of pieces than `pieces`, or not done within `drain_s`). The chat process's
    CPU (and that of the processes in `also`) and the calls in flight are read over that window."""
    loop = asyncio.get_running_loop()
    clock = loop.time
    skip = int(rate * warmup)
    n = skip + int(rate * seconds)
    timings: list[Timing] = []
    failed = 0
    running = 0
    late = 0
    tasks: set[asyncio.Task] = set()
    t0 = clock()
    window = (t0 + warmup, t0 + warmup + seconds)
    samples: list[int] = []
    used = ProcessCpu(pid, *(also or {}).values())

    async def watch() -> None:
        await asyncio.sleep(max(0.0, window[0] - clock()))
        used.__enter__()
        while clock() < window[1]:
            samples.append(running)
            await asyncio.sleep(0.05)
        used.__exit__()

    async def call(i: int, timing: Timing) -> None:
        nonlocal failed, running
        running += 1
        try:
            await one(timing)
            ok = timing.ended is not None and (pieces is None or len(timing.pieces) == pieces)
        except Exception:
            ok = False
        finally:
            running -= 1
        if i >= skip:
            if ok:
                timings.append(timing)
            else:
                failed += 1

    watcher = loop.create_task(watch())
    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001 and i >= skip:
            late += 1
        task = loop.create_task(call(i, Timing(scheduled)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await watcher
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        failed += len(pending)  # cancelled before counting themselves (warm-up ones included)
    ttft, gaps = [], []
    for t in timings:
        marks = t.pieces or [t.ended]
        ttft.append((marks[0] - t.scheduled) * 1000)
        gaps += [(b - a) * 1000 for a, b in zip(marks, marks[1:], strict=False)]
    planned = n - skip
    per_call = used.per_call(planned)
    return Phase(
        ttft,
        gaps,
        failed,
        planned,
        sum(samples) / max(len(samples), 1),
        per_call[0],
        late,
        dict(zip(also or {}, per_call[1:], strict=True)),
    )


# --- the benchmark ---


async def run(env: BenchEnv) -> list[Figure]:
    seconds = 6 if env.quick else 15
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    schema = f"bench_stream_{uuid.uuid4().hex[:6]}"
    admin = await wait_for_broker(env.kafka_bootstrap, 60)
    await ensure_topics(admin, topic_specs(partitions=3, prefix=prefix))
    logs = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    sim = ServiceProcess("simulator", "services.provider_simulator", {}, logs)
    sim.env.update(SIM_PORT=str(sim.port), SIM_VALID_KEYS=FAST_KEY)
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
        await migrate(env.database_url, schema)
        credits = ServiceProcess("credits", "services.credits", common, logs)
        procs.append(credits.start())
        validation = ServiceProcess("validation", "services.validation", common, logs)
        procs.append(validation.start())
        chat = ServiceProcess(
            "chat", "services.chat", {**common, "CREDITS_URL": credits.url, "COOKIE_SECURE": "false"}, logs
        )
        procs.append(chat.start())
        return await measure(chat, sim, seconds)
    finally:
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


async def measure(chat: ServiceProcess, sim: ServiceProcess, seconds: float) -> list[Figure]:
    length_s = (CHUNKS - 1) * GAP_MS / 1000  # a paced stream's length, from its first piece to its last
    warmup = length_s + 1.0  # the ramp up to N in flight, and warm connections
    async with httpx.AsyncClient(timeout=30) as http:  # set-up only; the load goes through SseClient
        r = await http.post(
            f"{sim.url}/_sim/keys",
            json={"key": SLOW_KEY, "behaviour": "stream_slow", "delay_ms": GAP_MS, "chunks": CHUNKS},
        )
        r.raise_for_status()
        users: dict[str, list[tuple[str, str]]] = {SLOW_KEY: [], FAST_KEY: []}  # key -> (token, key cookie)
        for key, group in users.items():
            for i in range(USERS):
                token = mint_token(SECRET, f"bench-{'paced' if key == SLOW_KEY else 'fast'}-{i}", ttl_s=3600)
                r = await http.post(
                    f"{chat.url}/settings/model",
                    headers={"Authorization": f"Bearer {token}"},
                    json={"provider": "openai", "model": MODEL, "use_own_key": True, "api_key": key},
                )
                r.raise_for_status()
                group.append((token, r.cookies["byok_key"]))

    direct_path = urlsplit(base_urls(sim.url)["OPENAI_BASE_URL"]).path + "/chat/completions"

    def direct_body(stream: bool) -> dict:
        # What providers/openai.py sends (stream_body), with the chat's system prompt for the chat feature.
        body: dict = {
            "model": MODEL,
            "max_tokens": 1024,
            "messages": [
                {"role": "system", "content": "You are a helpful data-analysis assistant."},
                {"role": "user", "content": MESSAGE},
            ],
        }
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    def direct_streams(client: SseClient, key: str) -> Callable[[Timing], Awaitable[None]]:
        raw = client.prepare(
            "POST", direct_path, json_body=direct_body(True), headers={"Authorization": f"Bearer {key}"}
        )

        async def one(timing: Timing) -> None:
            def on_event(event: Sse) -> None:
                if event.data == b"[DONE]":
                    timing.ended = event.at
                    return
                chunk = json.loads(event.data)
                choices = chunk.get("choices")
                if choices and choices[0]["delta"].get("content"):
                    timing.piece(event.at)

            if await client.stream(raw, on_event) != 200:
                timing.ended = None

        return one

    def chat_streams(client: SseClient, key: str) -> Callable[[Timing], Awaitable[None]]:
        raws = [
            client.prepare(
                "POST",
                "/chat",
                json_body={"feature": "chat", "message": MESSAGE, "stream": True},
                headers={"Authorization": f"Bearer {token}", "Cookie": f"byok_key={cookie}"},
            )
            for token, cookie in users[key]
        ]
        count = 0

        async def one(timing: Timing) -> None:
            nonlocal count
            count += 1

            def on_event(event: Sse) -> None:
                if event.name == "delta":
                    timing.piece(event.at)
                elif event.name == "done":
                    answer = json.loads(event.data)
                    if answer.get("key_source") == "byok" and answer.get("ending") == "completed":
                        timing.ended = event.at

            if await client.stream(raws[count % len(raws)], on_event) != 200:
                timing.ended = None

        return one

    def chat_plain(client: LeanClient, key: str) -> Callable[[Timing], Awaitable[None]]:
        raws = [
            client.prepare(
                "POST",
                "/chat",
                json_body={"feature": "chat", "message": MESSAGE},
                headers={"Authorization": f"Bearer {token}", "Cookie": f"byok_key={cookie}"},
            )
            for token, cookie in users[key]
        ]
        count = 0
        clock = asyncio.get_running_loop().time

        async def one(timing: Timing) -> None:
            nonlocal count
            count += 1
            answer = await client.send(raws[count % len(raws)])
            if answer.status == 200 and answer.json().get("ending") == "completed":
                timing.ended = clock()

        return one

    pid = chat.proc.pid
    results: dict[str, Phase] = {}
    for n in IN_FLIGHT:
        rate = n / length_s
        # The baseline right before the chat, so a load that comes and goes hits both alike.
        async with SseClient(sim.url) as client:
            results[f"direct/{n}"] = await open_loop(
                rate, warmup, seconds, direct_streams(client, SLOW_KEY), sim.proc.pid, pieces=CHUNKS
            )
        async with SseClient(chat.url) as client:
            results[f"chat/{n}"] = await open_loop(
                rate, warmup, seconds, chat_streams(client, SLOW_KEY), pid, pieces=CHUNKS
            )
    # CPU: the same short answer (a key that streams at once), plain then streamed, at the same rate.
    async with LeanClient(chat.url) as plain:
        results["plain"] = await open_loop(CPU_RATE, 2.0, seconds, chat_plain(plain, FAST_KEY), pid)
    async with SseClient(chat.url) as client:
        results["streamed"] = await open_loop(CPU_RATE, 2.0, seconds, chat_streams(client, FAST_KEY), pid)
    return figures_of(results, length_s)


def figures_of(results: dict[str, Phase], length_s: float) -> list[Figure]:
    figures: list[Figure] = []
    for n in IN_FLIGHT:
        direct, chat = results[f"direct/{n}"], results[f"chat/{n}"]
        label = f"{n} streams in flight ({n / length_s:.0f}/s, {CHUNKS} pieces {GAP_MS} ms apart)"
        figures += [
            Figure(NAME, f"{label}: mean in flight", chat.in_flight, "", "direct", direct.in_flight, "lower"),
            Figure(
                NAME,
                f"{label}: failed streams (of {chat.planned})",
                chat.failures,
                "",
                "direct failed",
                direct.failures,
                "lower",
                "0",
            ),
        ]
        if not (chat.ttft and direct.ttft):
            continue
        c50, d50 = percentile(chat.ttft, 50), percentile(direct.ttft, 50)
        c99, d99 = percentile(chat.ttft, 99), percentile(direct.ttft, 99)
        g50, h50 = percentile(chat.gaps, 50), percentile(direct.gaps, 50)
        g99, h99 = percentile(chat.gaps, 99), percentile(direct.gaps, 99)
        figures += [
            Figure(NAME, f"{label}: TTFT p50", c50, "ms", "simulator direct p50", d50, "lower"),
            Figure(NAME, f"{label}: TTFT p99", c99, "ms", "simulator direct p99", d99, "lower"),
            Figure(NAME, f"{label}: TTFT overhead p50 (chat - direct)", c50 - d50, "ms", "", None, "lower", "< 3 ms"),
            Figure(NAME, f"{label}: TTFT overhead p99 (chat - direct)", c99 - d99, "ms", "", None, "lower", "< 20 ms"),
            Figure(NAME, f"{label}: gap between pieces p50", g50, "ms", "simulator direct p50", h50, "lower"),
            Figure(NAME, f"{label}: gap between pieces p99", g99, "ms", "simulator direct p99", h99, "lower"),
            Figure(NAME, f"{label}: added per chunk p50 (chat - direct gap)", g50 - h50, "ms", "", None, "lower"),
            Figure(NAME, f"{label}: added per chunk p99 (chat - direct gap)", g99 - h99, "ms", "", None, "lower"),
            Figure(NAME, f"{label}: chat process CPU per stream", chat.cpu_ms, "ms", "", None, "lower"),
            Figure(
                NAME,
                f"{label}: generator late starts (> 1 ms)",
                chat.late_starts,
                "",
                "direct",
                direct.late_starts,
                "lower",
            ),
        ]
    plain, streamed = results["plain"], results["streamed"]
    label = f"same short answer at {CPU_RATE:.0f} calls/s"
    figures += [
        Figure(
            NAME,
            f"{label}: chat process CPU per streamed call",
            streamed.cpu_ms,
            "ms",
            "per plain call",
            plain.cpu_ms,
            "lower",
            "<= 1.20x",
        ),
        Figure(
            NAME,
            f"{label}: failed (of {streamed.planned})",
            streamed.failures,
            "",
            "plain failed",
            plain.failures,
            "lower",
            "0",
        ),
    ]
    if streamed.ttft and plain.ttft:
        figures.append(
            Figure(
                NAME,
                f"{label}: streamed TTFT p50",
                percentile(streamed.ttft, 50),
                "ms",
                "plain answer p50",
                percentile(plain.ttft, 50),
                "lower",
            )
        )
    return figures
