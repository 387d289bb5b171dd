"""`python -m services.credits`: the consumer, the outcome relay and the HTTP API in one process."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from services.credits.bootstrap import running
from services.credits.settings import CreditSettings
from services.shared.http import GracefulServer
from services.shared.logging import setup_logging
from services.shared.settings import refuse_default_secrets

log = logging.getLogger("services.credits")


async def serve(settings: CreditSettings) -> None:
    async with running(settings) as runtime:
        server = GracefulServer(
            uvicorn.Config(
                runtime.api(), host=settings.http_host, port=settings.http_port, log_level="warning", access_log=False
            )
        )
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
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
