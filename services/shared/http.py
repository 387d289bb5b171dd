"""Serving a service's HTTP API inside a process that owns other work (consumers, relays)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose SIGINT/SIGTERM only ask it to exit.

    uvicorn re-raises the stop signal once its own shutdown is done, which would end the process
    before the code after `serve()` (a consumer draining its batch, a worker committing its checks)
    has run; with this server, `await serve()` simply returns and that code runs.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
