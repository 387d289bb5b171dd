"""The HTTP client for calls to providers, shared by every user's calls (plumbing; what each provider's
API is lives in the top-level `providers` package, which reaches the network only through this
client's `providers.client.ProviderHttp` port).

aiohttp, not httpx: the chat process is CPU-bound and makes one provider call per chat call. Measured
against one local endpoint, httpx spent 0.84 ms of client CPU per request with 4 in flight and 1.7 ms
with 32 (httpcore walks and polls every pooled connection on each request); aiohttp 0.15 and 0.09 ms.

- No cookie jar: one client serves all users, so a cookie a provider set on one user's call (a
  session or load-balancer cookie) must not ride along on another user's call.
- No redirects followed: a key is sent only to the URL it was meant for.
- A chat completion (POST) is never sent twice. A connection that drops without an answer may
  drop after the provider received the whole request and worked on it, and a second attempt would
  then be paid twice (by the platform, or by the user's own provider account). Only aiohttp's own
  retry remains, for GET on a kept-alive connection (RFC 9112, 9.3.1): the key check's model list.
- Idle connections are dropped after `keepalive_s` (4 s by default), well before providers close
  idle connections (uvicorn, the simulator's server, after 5 s; real providers after a minute or
  more), so a request rarely meets a connection the provider has just closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from providers.client import HttpAnswer, ProviderUnreachable
from services.shared.client_session import LazySession, SessionClosed


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
        self._session = LazySession(
            lambda: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=keepalive_s),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self.timeout,
            )
        )

    async def request(self, method: str, url: str, headers: Mapping[str, str], body: Any = None) -> HttpAnswer:
        kw: dict[str, Any] = {"headers": dict(headers)}
        if body is not None:
            kw["json"] = body
        try:
            async with self._session.open().request(method, url, allow_redirects=False, **kw) as r:
                return HttpAnswer(r.status, await r.read(), r.headers)
        except SessionClosed:
            raise ProviderUnreachable("ClientClosed") from None
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
        await self._session.close()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
