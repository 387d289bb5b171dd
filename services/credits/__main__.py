"""`python -m services.credits`: the consumer, the outcome relay and the HTTP API in one process."""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import asyncio  # noqa: E402
import logging  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from services.credits.settings import CreditSettings  # noqa: E402
from services.shared import event_loop  # noqa: E402
from services.shared.logging import setup_logging  # noqa: E402
from services.shared.settings import refuse_default_secrets  # noqa: E402

if TYPE_CHECKING:
    from services.credits.bootstrap import CreditRuntime
    from services.shared.http import GracefulServer

log = logging.getLogger("services.credits")


def _http_server(settings: CreditSettings, runtime: CreditRuntime) -> GracefulServer:
    from services.shared.http import GracefulServer
    from services.shared.serving import server_config

    # uvicorn with the limits per connection of serving.py (shared by every service).
    return GracefulServer(server_config(runtime.api(), settings.http_host, settings.http_port))


async def serve(settings: CreditSettings) -> None:
    # Imported here: the relay's child process imports this module again (multiprocessing's spawn),
    # and needs none of it.
    from services.credits.bootstrap import running

    log.info("credit service starting (imports took %.2f s)", time.perf_counter() - _STARTED)
    async with running(settings) as runtime:
        # The consumer is debiting already. The HTTP side (FastAPI, uvicorn) takes about as long to
        # import and build as the whole consumer did: in a thread, so the event loop keeps consuming.
        server = await asyncio.to_thread(_http_server, settings, runtime)
        log.info(
            "credit service up: consuming %s, API on %s:%d",
            settings.model_call_completed_topic,
            settings.http_host,
            settings.http_port,
        )
        await server.serve()  # returns on SIGINT/SIGTERM
    log.info("credit service stopped")


def main() -> None:
    settings = CreditSettings()
    refuse_default_secrets("The credit service", settings)
    setup_logging(settings.log_level, "credits")
    event_loop.run(serve(settings))


if __name__ == "__main__":
    main()
