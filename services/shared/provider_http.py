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
- A streamed answer (`post_stream`) waits at most `stream_idle_timeout_s` (by default `timeout_s`)
  for each next piece of the body, so a provider that stops sending without closing raises
  `ProviderUnreachable(timed_out=True)`; the response is closed when the consumer leaves the block,
  however it leaves (read to the end, an error, its task cancelled: the chat's Stop), and one left
  before its end closes its connection, so the provider sees the caller go away.
- Idle connections are dropped after `keepalive_s` (4 s by default), well before providers close
  idle connections (uvicorn, the simulator's server, after 5 s; real providers after a minute or
  more), so a request rarely meets a connection the provider has just closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from providers.client import HttpAnswer, HttpStream, ProviderUnreachable
from services.shared.client_session import LazySession, SessionClosed


class ProviderClient:
    def __init__(
        self,
        *,
        timeout_s: float,
        connect_timeout_s: float | None = None,
        max_connections: int = 100,
        keepalive_s: float = 4.0,
        stream_idle_timeout_s: float | None = None,
    ):
        connect = connect_timeout_s if connect_timeout_s is not None else timeout_s
        # Waiting for a pooled connection and connecting count against `timeout_s`; the TCP (and TLS)
        # connect alone against `connect_timeout_s`; each read of the answer against `timeout_s`.
        self.timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=connect, sock_read=timeout_s)
        # A stream: the same, but each read (the headers, then every next piece of the body) waits at
        # most the idle timeout; a stream as a whole may last as long as the provider keeps sending.
        idle = stream_idle_timeout_s if stream_idle_timeout_s is not None else timeout_s
        self.stream_timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=connect, sock_read=idle)
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

    @asynccontextmanager
    async def post_stream(self, url: str, headers: Mapping[str, str], body: Any) -> AsyncIterator[HttpStream]:
        """`providers.client.ProviderHttp.post_stream`: the answer's status and headers, its body as it arrives."""
        try:
            response = await self._session.open().post(
                url, headers=dict(headers), json=body, allow_redirects=False, timeout=self.stream_timeout
            )
        except SessionClosed:
            raise ProviderUnreachable("ClientClosed") from None
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise ProviderUnreachable(type(exc).__name__, timed_out=True) from None
        except aiohttp.ClientError as exc:
            raise ProviderUnreachable(type(exc).__name__) from None
        try:
            yield HttpStream(response.status, response.headers, _chunks(response))
        finally:
            if response.content.is_eof():
                response.release()  # read to its end: the connection may serve another request
            else:
                response.close()  # left midway: close the connection, so the provider stops

    async def aclose(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body as it arrives; a stall beyond the read timeout or a broken-off body as `ProviderUnreachable`."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise ProviderUnreachable(type(exc).__name__, timed_out=True) from None
    except aiohttp.ClientError as exc:
        # A body that ends before its end (a chunked body without its last chunk, a short
        # Content-Length): aiohttp's ClientPayloadError.
        raise ProviderUnreachable(type(exc).__name__) from None
