"""The HTTP client for calls to providers, shared by every user's calls (plumbing; what each provider's
API is lives in the top-level `providers` package, which reaches the network only through this
client's `providers.client.ProviderHttp` port).

aiohttp, not httpx: the chat process is CPU-bound and makes one provider call per chat call. Measured
against one local endpoint, httpx spent 0.84 ms of client CPU per request with 4 in flight and 1.7 ms
with 32 (httpcore walks and polls every pooled connection on each request); aiohttp 0.15 and 0.09 ms.

- No cookie jar: one client serves all users, so a cookie a provider set on one user's call (a
  session or load-balancer cookie) must not ride along on another user's call.
- No redirects followed: a key is sent only to the URL it was meant for.
- A request that failed before any answer came back (a kept-alive connection the provider had just
  closed) is sent once more, on a new connection: aiohttp does so itself for GET (RFC 9112, 9.3.1),
  this client for POST. A timeout is not retried (the provider may be working on the call), nor a
  refused connection, nor anything after the answer's status line arrived.
- Idle connections are dropped after `keepalive_s` (4 s by default: before the 5 s of uvicorn, the
  simulator's server, so tests do not lean on the retry).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from providers.client import HttpAnswer, ProviderUnreachable

# No answer came back on a connection that was open: worth one more attempt on a new connection.
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class ProviderClient:
    def __init__(
        self,
        *,
        timeout_s: float,
        connect_timeout_s: float | None = None,
        max_connections: int = 100,
        keepalive_s: float = 4.0,
    ):
        connect = connect_timeout_s if connect_timeout_s is not None else timeout_s
        # Waiting for a pooled connection and connecting count against `timeout_s`; the TCP (and TLS)
        # connect alone against `connect_timeout_s`; each read of the answer against `timeout_s`.
        self.timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=connect, sock_read=timeout_s)
        self.max_connections, self.keepalive_s = max_connections, keepalive_s
        self._pooled: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self.retries = 0  # how many requests needed the second attempt (for tests and metrics)

    def _session(self, fresh: bool = False) -> aiohttp.ClientSession:
        # Created on first use, inside the running event loop (aiohttp binds a session to its loop).
        current = self._fresh if fresh else self._pooled
        if current is None or current.closed:
            connector = (
                aiohttp.TCPConnector(limit=self.max_connections, force_close=True)
                if fresh
                else aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=self.keepalive_s)
            )
            current = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=self.timeout
            )
            if fresh:
                self._fresh = current
            else:
                self._pooled = current
        return current

    async def _send(self, session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> HttpAnswer:
        async with session.request(method, url, allow_redirects=False, **kw) as r:
            return HttpAnswer(r.status, await r.read(), r.headers)

    async def request(self, method: str, url: str, headers: Mapping[str, str], body: Any = None) -> HttpAnswer:
        kw: dict[str, Any] = {"headers": dict(headers)}
        if body is not None:
            kw["json"] = body
        try:
            try:
                return await self._send(self._session(), method, url, **kw)
            except aiohttp.ClientConnectorError:
                raise
            except _STALE:
                if method == "GET":
                    raise  # aiohttp already sent it once more
                self.retries += 1
                return await self._send(self._session(fresh=True), method, url, **kw)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise ProviderUnreachable(type(exc).__name__, timed_out=True) from None
        except aiohttp.ClientError as exc:
            # The exception text may hold the URL but never the key (it travels in headers only).
            raise ProviderUnreachable(type(exc).__name__) from None

    async def get(self, url: str, headers: Mapping[str, str]) -> HttpAnswer:
        return await self.request("GET", url, headers)

    async def post_json(self, url: str, headers: Mapping[str, str], body: Any) -> HttpAnswer:
        return await self.request("POST", url, headers, body)

    async def aclose(self) -> None:
        for session in (self._pooled, self._fresh):
            if session is not None:
                await session.close()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
