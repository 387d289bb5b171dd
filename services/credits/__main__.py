"""`python -m services.credits`: the consumer, the outcome relay and the HTTP API in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn

from services.credits.bootstrap import running
from services.credits.settings import CreditSettings
from services.shared.logging import setup_logging

log = logging.getLogger("services.credits")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises SIGTERM/SIGINT once its own shutdown is done, which would end the process
        # before the consumer drains its batch in flight; here a signal only asks the server to exit.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def serve(settings: CreditSettings) -> None:
    async with running(settings) as runtime:
        server = _Server(uvicorn.Config(runtime.api(), host=settings.http_host, port=settings.http_port,
                                        log_level="warning", access_log=False))
        log.info("credit service up: consuming %s, API on %s:%d",
                 settings.model_call_completed_topic, settings.http_host, settings.http_port)
        await server.serve()  # returns on SIGINT/SIGTERM
    log.info("credit service stopped")


def main() -> None:
    settings = CreditSettings()
    setup_logging(settings.log_level, "credits")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
