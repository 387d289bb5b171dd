"""The chat's HTTP client for the credit service: admission holds, balances, usage, dev grants.

Every platform call places a hold before it starts, so this client is on the chat's hot path. It is
aiohttp rather than httpx: measured against one local endpoint, httpx spent 0.84 ms of client CPU per
request with 4 in flight and 1.7 ms with 32 (httpcore walks and polls every pooled connection on
each request), aiohttp 0.15 and 0.09 ms. The chat process is CPU-bound, so that difference is
latency for every user under load (see `make bench`, "chat process CPU per call").

- Every route it calls is idempotent (holds are keyed by event id, grants by grant key, the rest
  are reads or releases), so a request that failed before any answer came back (a kept-alive
  connection the server had just closed) is sent once more on a new connection: aiohttp does so
  itself for GET and DELETE (RFC 9112, 9.3.1), this client for its POSTs. A refused connection is
  not retried.
- Idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive timeout closes them.
- No cookie jar: the client serves every user's requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.client import IDEMPOTENT_METHODS

from services.shared.client_session import LazySession, SessionClosed

# No answer came back on a connection that was open: worth one more attempt on a new connection.
_RETRIED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class CreditsUnreachable(Exception):
    """No usable answer from the credit service (down, slow, or the connection failed)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # the decoded JSON body, or None when it was not JSON


class CreditsClient:
    def __init__(self, base_url: str, timeout_s: float, *, max_connections: int = 64, queue_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        # `timeout_s` bounds the credit service's own part: connecting, then each wait for its answer.
        # Waiting for one of the `max_connections` is not the service failing to answer: a burst of
        # holds (1,500 calls at once) queues here, up to `queue_s`, instead of timing out as a 503.
        self.timeout = aiohttp.ClientTimeout(total=queue_s + timeout_s, sock_connect=timeout_s, sock_read=timeout_s)
        self._session = LazySession(
            lambda: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=2.0),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self.timeout,
                json_serialize=json.dumps,
            )
        )

    async def request(
        self,
        method: str,
        path: str,
        token: str,
        *,
        json_body: Any = None,
        params: dict[str, str | int] | None = None,
    ) -> Answer:
        """One request with `token` as the bearer; raises CreditsUnreachable when no answer came."""
        url = self.base_url + path
        headers = {"Authorization": f"Bearer {token}"}
        # aiohttp already sends its idempotent methods once more; the POSTs here are idempotent too.
        attempts = (1,) if method in IDEMPOTENT_METHODS else (1, 2)
        for attempt in attempts:
            try:
                session = self._session.open()
            except SessionClosed:
                raise CreditsUnreachable("the chat is shutting down") from None
            try:
                async with session.request(method, url, json=json_body, params=params, headers=headers) as r:
                    raw = await r.read()
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        body = None
                    return Answer(r.status, body)
            except (TimeoutError, aiohttp.ClientError) as exc:
                # Once more only for a connection that dropped without an answer; a refused connection
                # (nothing listens) would be refused again.
                stale = isinstance(exc, _RETRIED) and not isinstance(exc, aiohttp.ClientConnectorError)
                if not stale or attempt == attempts[-1]:
                    raise CreditsUnreachable(f"the credit service did not answer ({type(exc).__name__})") from None
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._session.close()
