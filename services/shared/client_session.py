"""One aiohttp session per client object, made on first use and never again once closed.

A session binds to the running event loop, so it is made inside it, at the first request. After
`close()`, a request still running at shutdown must not open a session nobody closes: `open()` then
raises `SessionClosed`, which each client turns into its own "no answer" error.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp


class SessionClosed(Exception):
    """The client was closed; no request goes out any more."""


class LazySession:
    def __init__(self, make: Callable[[], aiohttp.ClientSession]):
        self._make = make
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def opened(self) -> bool:
        """Whether a session was ever made (for tests: a closed client opens none)."""
        return self._session is not None

    def open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise SessionClosed
        if self._session is None:
            self._session = self._make()
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
