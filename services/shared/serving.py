"""How every service's HTTP server is run: uvicorn (uvloop, httptools) with limits per connection.

uvicorn alone lets one client stop a service: it never closes a connection that has not finished
its request headers (21,000 idle half-sent requests from one host once used up the chat's open
files), it reads a header of any size (one 100 MB header took 140 MB and 16 s of CPU), and it waits
for a body as long as the client likes. `server_config` builds the uvicorn configuration of a service
with what it lacks, all read from the environment (`ServingSettings`, defaults in brackets):

| variable | default | what happens beyond it |
|---|---|---|
| `HTTP_MAX_HEADER_BYTES` | 16384 | request line and headers larger than this: 431 and the connection is closed |
| `HTTP_HEADER_TIMEOUT_S` | 10 | headers not complete this long after the connection opened or the request's first byte: 408 (nothing if no byte came) and closed |
| `HTTP_BODY_TIMEOUT_S` | 30 | body not complete this long after its headers: 408 (if no answer has started) and closed |
| `HTTP_KEEPALIVE_S` | 15 | an idle kept-alive connection is closed (uvicorn's `timeout_keep_alive`) |
| `HTTP_MAX_CONNECTIONS` | 10000 | a new connection beyond this is closed at once (never answered) |
| `HTTP_MAX_CONNECTIONS_PER_CLIENT` | 1000 | the same, counted per client address; 0 turns it off (behind a proxy, where every client has the proxy's address) |
| `HTTP_MAX_IN_FLIGHT` | 1000 | a request beyond this many being answered at once: 503 with a sentence and `Retry-After` |
| `HTTP_BACKLOG` | 4096 | connections the kernel queues before the server accepts them (capped by `net.core.somaxconn`) |

At start-up the soft limit of open files (`RLIMIT_NOFILE`) is raised to what these need
(`HTTP_MAX_CONNECTIONS` plus 1024 for the database pool, Kafka, provider calls and logs), as far as
the hard limit lets (a process that may raise the hard limit raises that too); if it cannot be met,
`HTTP_MAX_CONNECTIONS` is lowered to fit and a warning says so, so the service refuses connections
rather than failing on `accept` and `open` for everyone.

The HTTP implementation is uvicorn's `httptools` one (what `auto` picks when httptools is installed),
subclassed: `h11` would bound the headers (`h11_max_incomplete_event_size`) but has no timeouts either,
and parses in pure Python.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import Counter
from typing import Any

import uvicorn
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("services.serving")

# File descriptors a service needs besides its HTTP connections: the database pool, Kafka clients,
# provider connections, log files, the interpreter's own.
FD_RESERVE = 1024


class ServingSettings(BaseSettings):
    """Limits per connection and per process of a service's HTTP server (see the module's table)."""

    model_config = SettingsConfigDict(env_prefix="HTTP_", env_file=None, extra="ignore")

    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_s: int = 15
    max_connections: int = 10_000
    max_connections_per_client: int = 1000
    max_in_flight: int = 1000
    backlog: int = 4096


def raise_open_files(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards `wanted` (and the hard one, if allowed); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass  # not privileged: up to the hard limit
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _response(status: int, phrase: str, sentence: str) -> bytes:
    """A whole HTTP response in the services' error shape, written by the server itself (no app ran)."""
    body = json.dumps({"error": phrase.lower().replace(" ", "_"), "message": sentence}).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


HEADERS_TOO_LARGE = _response(
    431,
    "Request Header Fields Too Large",
    "The request line and headers are larger than this service accepts. Send smaller headers.",
)
HEADERS_TOO_SLOW = _response(
    408, "Request Timeout", "The request headers did not arrive in time; the connection is closed."
)
BODY_TOO_SLOW = _response(408, "Request Timeout", "The request body did not arrive in time; the connection is closed.")


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on header size, header and body timeouts and
    connection caps. `limits` and `per_client` are set on the subclass `protocol_class` makes for
    one server."""

    limits: ServingSettings
    per_client: Counter[str]
    open_connections: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True
        self._header_bytes = 0
        self._any_byte = False
        self._counted: str | None = None
        self._deadline: asyncio.TimerHandle | None = None

    # --- connections ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        cls = type(self)
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else "?"
        limits = self.limits
        if cls.open_connections >= limits.max_connections or (
            limits.max_connections_per_client and cls.per_client[host] >= limits.max_connections_per_client
        ):
            # Never reaches the app and holds nothing: the descriptor is freed at once.
            self.transport = transport
            transport.abort()
            return
        cls.open_connections += 1
        cls.per_client[host] += 1
        self._counted = host
        super().connection_made(transport)
        self._arm(limits.header_timeout_s, self._headers_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted is None:
            return  # refused in connection_made: uvicorn never knew it
        cls = type(self)
        cls.open_connections -= 1
        cls.per_client[self._counted] -= 1
        if cls.per_client[self._counted] <= 0:
            del cls.per_client[self._counted]
        self._counted = None
        super().connection_lost(exc)

    # --- timers -----------------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _close_with(self, response: bytes | None) -> None:
        # Cancelled, not only forgotten: a pending timer holds the protocol (parser, buffers, cycle)
        # until it fires, so a client opening thousands of connections a second that are each refused
        # at once (a 431) kept 10 s worth of them alive (some 200 MiB).
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's reads end, its writes are dropped
            self.cycle.message_event.set()
        if response is not None:
            self.transport.write(response)
        self.transport.close()

    def _headers_timed_out(self) -> None:
        # A connection that never sent a byte (a browser's pre-connection) is closed without an answer.
        self._close_with(HEADERS_TOO_SLOW if self._any_byte else None)

    def _body_timed_out(self) -> None:
        started = self.cycle is not None and self.cycle.response_started
        self._close_with(None if started else BODY_TOO_SLOW)

    # --- bytes and parser callbacks ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        self._any_byte = True
        counting = self._awaiting_headers
        super().data_received(data)
        if counting and self._awaiting_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._close_with(HEADERS_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        self._header_bytes = 0
        if self._deadline is None:  # a kept-alive connection's next request: its headers get the same time
            self._arm(self.limits.header_timeout_s, self._headers_timed_out)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._arm(self.limits.body_timeout_s, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def protocol_class(limits: ServingSettings) -> type[LimitedHttpToolsProtocol]:
    """A protocol class of one server's own (its counters are the server's)."""
    return type(
        "LimitedHttpToolsProtocol",
        (LimitedHttpToolsProtocol,),
        {"limits": limits, "per_client": Counter(), "open_connections": 0},
    )


class InFlightLimit:
    """ASGI middleware: beyond `max_in_flight` HTTP requests being answered, 503 with a sentence.

    (uvicorn's `limit_concurrency` counts open connections as well, so idle connections would
    make every request a 503.)"""

    def __init__(self, app: ASGIApp, max_in_flight: int) -> None:
        self.app, self.max_in_flight, self.in_flight = app, max_in_flight, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            body = (
                b'{"error": "unavailable", "message": "This service is answering as many requests as it can '
                b'right now. Try again in a few seconds."}'
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", b"5"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def server_config(
    app: Any, host: str, port: int, limits: ServingSettings | None = None, **kwargs: Any
) -> uvicorn.Config:
    """The uvicorn configuration of a service: its app behind the limits, no access log."""
    limits = limits or ServingSettings()
    nofile = raise_open_files(limits.max_connections + FD_RESERVE)
    if nofile < limits.max_connections + FD_RESERVE:
        fitted = max(64, nofile - FD_RESERVE)
        log.warning(
            "only %d open files allowed (RLIMIT_NOFILE): HTTP_MAX_CONNECTIONS lowered from %d to %d",
            nofile,
            limits.max_connections,
            fitted,
        )
        limits = limits.model_copy(update={"max_connections": fitted})
    options: dict[str, Any] = {"log_level": "warning", "access_log": False, "log_config": None, **kwargs}
    return uvicorn.Config(
        InFlightLimit(app, limits.max_in_flight),
        host=host,
        port=port,
        http=protocol_class(limits),
        timeout_keep_alive=limits.keepalive_s,
        backlog=limits.backlog,
        **options,
    )
