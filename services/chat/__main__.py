"""`python -m services.chat`: the HTTP app (port 8000) and the outbox relay in one process."""

from __future__ import annotations

import logging

from services.chat.app import serving_app
from services.chat.bootstrap import wire
from services.chat.settings import ChatSettings
from services.shared.http import GracefulServer
from services.shared.logging import setup_logging
from services.shared.sealing import SealingSettings
from services.shared.serving import server_config
from services.shared.settings import refuse_default_secrets


def main() -> None:
    settings = ChatSettings()
    # The chat seals users' keys to the worker's public key: the repository's pair is no secret.
    refuse_default_secrets("The chat service", settings, (SealingSettings(), ("public_keys",)))
    setup_logging(settings.log_level, "chat")
    app = serving_app(settings, wire)
    log = logging.getLogger(__name__)
    log.info("chat service on http://%s:%d/", settings.http_host, settings.http_port)
    # Like credits and validation: SIGTERM/SIGINT finish the requests in flight (their outbox rows
    # complete), stop the relay through the lifespan, and the process then exits 0 rather than by
    # the re-raised signal. uvloop and httptools, with the limits per connection of serving.py
    # (header size and time, body time, keep-alive, connections, requests in flight, open files).
    server = GracefulServer(server_config(app, settings.http_host, settings.http_port))
    server.run()
    log.info("chat service stopped")


if __name__ == "__main__":
    main()
