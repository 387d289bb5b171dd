"""`python -m services.validation`: the key-check worker, with `GET /healthz` and `GET /metrics` on port 8002."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.shared import event_loop
from services.shared.http import GracefulServer
from services.shared.kafka import OutageLog
from services.shared.logging import setup_logging
from services.shared.sealing import SealingSettings
from services.shared.serving import server_config
from services.shared.settings import refuse_default_secrets
from services.validation.bootstrap import Validation, build
from services.validation.settings import ValidationSettings

log = logging.getLogger("services.validation")


def health_app(validation: Validation) -> FastAPI:
    app = FastAPI(title="validation worker", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> Response:
        if validation.worker.running:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "consumer not running"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def start_worker(validation: Validation) -> None:
    """Start the worker, waiting for the broker if it is not up yet (one line when it is not, one when
    it answers, however long it takes)."""
    outage = OutageLog(log, "validation worker")
    while True:
        try:
            await validation.worker.start()
            outage.up()
            return
        except Exception as exc:
            outage.down("Kafka", exc)
            await asyncio.sleep(1)


async def serve(settings: ValidationSettings) -> None:
    sealing = SealingSettings()
    if sealing.uses_dev_key:
        log.warning("using the DEV-ONLY sealing key pair from the repository; set KEY_SEAL_* in production")
    validation = build(settings, sealing)
    await start_worker(validation)
    server = GracefulServer(server_config(health_app(validation), settings.http_host, settings.http_port))
    log.info(
        "validation worker up: consuming %s, health on %s:%d (keys: %s)",
        settings.key_check_requests_topic,
        settings.http_host,
        settings.http_port,
        ", ".join(sealing.private_keys),
    )
    try:
        await server.serve()  # returns on SIGINT/SIGTERM
    finally:
        await validation.stop()
        log.info("validation worker stopped")


def main() -> None:
    settings = ValidationSettings()
    # The worker keeps no database and no token secret: only its sealing private keys are secret.
    refuse_default_secrets("The key-check worker", (SealingSettings(), ("private_keys",)))
    setup_logging(settings.log_level, "validation")  # also keeps httpx's per-request lines out
    event_loop.run(serve(settings))


if __name__ == "__main__":
    main()
