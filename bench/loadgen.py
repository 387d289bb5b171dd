"""The benchmarks' load generator: an open-loop schedule at a fixed rate, sent over a lean HTTP/1.1 client.

Why not httpx here: the generator shares this machine's two cores with the services it measures, and
httpx spends about 2 ms of CPU per request on it (more as its pool grows), as much as the service under
test; this client spends a tenth of that, so the figures measure the services, not the generator.
It only ever talks plain HTTP/1.1 to our own local servers: one write per request, responses parsed
by `httptools` (the parser uvicorn itself uses), connections kept alive and reused.

`steady` measures each latency from the request's *scheduled* send time, so a generator or a server
that falls behind shows up as latency (queueing), not as a quietly lower rate; a request that fails or
does not finish by the deadline is counted, not dropped.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


class HttpFailed(Exception):
    """The connection broke or the answer could not be parsed."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.chunks: list[bytes] = []
        self.usable = True

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpFailed(f"unparsable answer: {exc}"))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.usable = False
        self._fail(HttpFailed(f"connection lost: {exc or 'closed by the server'}"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.usable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(Answer(self.parser.get_status_code(), b"".join(self.chunks)))

    def _fail(self, exc: Exception) -> None:
        self.usable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    async def send(self, raw: bytes) -> Answer:
        if not self.usable or self.transport.is_closing():
            raise HttpFailed("connection closed")
        self.chunks = []
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        try:
            return await self.waiter
        finally:
            self.waiter = None


class LeanClient:
    """A pool of keep-alive HTTP/1.1 connections to one `http://host:port` origin.

    A request takes an idle connection or opens a new one (open loop: nothing waits for a free
    connection), and gives it back when the answer is complete.
    """

    def __init__(self, origin: str):
        parts = urlsplit(origin)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError("an origin like http://127.0.0.1:8000")
        self.host, self.port = parts.hostname, parts.port
        self._host_header = f"{self.host}:{self.port}".encode()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()

    @staticmethod
    def encode(method: str, path: str, host: bytes, body: bytes | None, headers: Mapping[str, str]) -> bytes:
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + host]
        lines += [f"{k}: {v}".encode() for k, v in headers.items()]
        if body is not None:
            lines.append(b"Content-Length: " + str(len(body)).encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")

    def prepare(self, method: str, path: str, *, json_body=None, headers: Mapping[str, str] | None = None) -> bytes:
        """The request's bytes, to build once and send many times."""
        headers = dict(headers or {})
        body = None
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":")).encode()
            headers.setdefault("Content-Type", "application/json")
        return self.encode(method, path, self._host_header, body, headers)

    async def send(self, raw: bytes) -> Answer:
        connection = None
        while self._idle and connection is None:
            connection = self._idle.pop()
            if not connection.usable:  # closed by the server while idle (its keep-alive timeout)
                self._all.discard(connection)
                connection = None
        if connection is None:
            connection = await self._connect()
        try:
            answer = await connection.send(raw)
        except BaseException:
            connection.usable = False
            raise
        finally:
            if connection.usable:
                self._idle.append(connection)
            else:
                self._all.discard(connection)
                connection.transport.close()
        return answer

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(_Connection, self.host, self.port)
        except OSError as exc:
            raise HttpFailed(f"cannot connect: {exc}") from None
        self._all.add(connection)
        return connection

    @property
    def connections(self) -> int:
        return len(self._all)

    async def aclose(self) -> None:
        for connection in self._all:
            connection.transport.close()
        self._all.clear()
        self._idle.clear()

    async def __aenter__(self) -> LeanClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


@dataclass
class Run:
    """What one steady run measured: latencies (ms, from each scheduled send time) and failures."""

    latencies: list[float]
    failures: int
    planned: int
    late_starts: int  # requests the generator itself started more than 1 ms after their time


async def steady(rate: float, seconds: float, send: Callable[[int], Awaitable[bool]], *, drain_s: float = 30.0) -> Run:
    """Call `send(i)` for i = 0, 1, ... at a fixed `rate` for `seconds` (open loop: a slow answer
    delays no later start). `send` answers True for a good answer; False, an exception, or no answer
    within `drain_s` after the last start counts as a failure."""
    n = int(rate * seconds)
    latencies: list[float] = []
    failures = late = 0
    loop = asyncio.get_running_loop()
    clock = loop.time
    tasks: set[asyncio.Task] = set()

    async def one(i: int, scheduled: float) -> None:
        nonlocal failures
        try:
            ok = await send(i)
        except Exception:
            ok = False
        if ok:
            latencies.append((clock() - scheduled) * 1000)
        else:
            failures += 1

    t0 = clock()
    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            late += 1
        task = loop.create_task(one(i, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain_s)
        for task in pending:
            task.cancel()
        failures += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    return Run(latencies, failures, n, late)
