"""The HTTP client for calls to providers, shared by every user's calls (plumbing; what each provider's
API is lives in the top-level `providers` package).

A call that fails before any response byte (a pooled connection the provider had closed) is sent once
more, on a fresh connection; the client's cookie jar keeps nothing.
"""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx


class FreshConnectionRetry(httpx.AsyncBaseTransport):
    """A pooled transport that sends a request once more, on a new connection, when it failed before
    any response came back.

    A kept-alive connection can be closed by the provider (its idle timeout) just as a request goes
    out on it: the request then fails with "server disconnected without sending a response" or a
    reset, although the provider never saw it and the key is fine. One more attempt on a connection
    opened for it settles that; a timeout is not retried (the provider may be working on the call),
    nor is anything after the response's status line arrived.
    """

    RETRIED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

    def __init__(self, limits: httpx.Limits):
        self.pooled = httpx.AsyncHTTPTransport(limits=limits)
        # Keeps no connection: every request it sends goes out on a new one.
        self.fresh = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=limits.max_connections, max_keepalive_connections=0)
        )
        self.retries = 0  # how many requests needed the second attempt (for tests and metrics)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.pooled.handle_async_request(request)
        except self.RETRIED:
            if not isinstance(request.stream, httpx.ByteStream):
                raise  # a streamed body cannot be sent twice
            self.retries += 1
            return await self.fresh.handle_async_request(request)

    async def aclose(self) -> None:
        await self.pooled.aclose()
        await self.fresh.aclose()


def provider_http_client(
    *, timeout: httpx.Timeout | float, limits: httpx.Limits, follow_redirects: bool = False
) -> httpx.AsyncClient:
    """An httpx client for calls to providers, shared by every user's calls.

    Its cookie jar keeps nothing: one client serves all users, so a cookie a provider set on one
    user's call (a session or load-balancer cookie) must not ride along on another user's call.
    A call that fails before any response byte is sent once more on a fresh connection
    (`FreshConnectionRetry`).
    """
    return httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=follow_redirects,
        transport=FreshConnectionRetry(limits),
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )
