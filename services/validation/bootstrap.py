"""Composition root: one settings object in, a wired worker out (tests call it with their settings)."""

from __future__ import annotations

from dataclasses import dataclass

from providers.client import ProviderHttp
from services.shared.provider_http import ProviderClient
from services.shared.sealing import KeyOpener, SealingSettings
from services.validation.checks import KeyChecker, make_http_client
from services.validation.guards import UserRateLimit, VerdictCache
from services.validation.handler import RequestHandler
from services.validation.service import KeyCheckService
from services.validation.settings import ValidationSettings
from services.validation.worker import ValidationWorker


@dataclass
class Validation:
    settings: ValidationSettings
    http: ProviderClient
    service: KeyCheckService
    worker: ValidationWorker

    async def start(self) -> None:
        await self.worker.start()

    async def stop(self) -> None:
        try:
            await self.worker.stop()
        finally:
            await self.http.aclose()


def build_service(settings: ValidationSettings, http: ProviderHttp) -> KeyCheckService:
    """The check use case alone (the benchmark's in-process baseline uses it too)."""
    return KeyCheckService(
        KeyChecker(settings, http),
        VerdictCache(settings.cache_ttl_s, settings.cache_max_entries),
        UserRateLimit(settings.user_checks_per_minute),
    )


def build(settings: ValidationSettings, sealing: SealingSettings | None = None) -> Validation:
    http = make_http_client(settings.check_timeout_s, settings.check_connect_timeout_s)
    service = build_service(settings, http)
    handler = RequestHandler(
        service, KeyOpener.from_settings(sealing), settings.key_check_replies_topic, settings.max_request_age_s
    )
    return Validation(settings, http, service, ValidationWorker(settings, handler))
