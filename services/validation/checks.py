"""The provider check: the cheapest authenticated call that proves a key (its model list)."""

from __future__ import annotations

import providers
from providers import KeyVerdict, ProviderSettings
from providers.client import ProviderHttp, ProviderUnreachable
from schemas.events import Provider
from services.shared.provider_http import ProviderClient


def make_http_client(timeout_s: float, connect_timeout_s: float, max_connections: int = 100) -> ProviderClient:
    """The provider client: short timeouts, every connection kept alive (a burst of checks should not
    pay for new TCP connections); its one retry is `services.shared.provider_http`'s."""
    return ProviderClient(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_connections=max_connections)


class KeyChecker:
    """Asks a provider whether a key works. Malformed keys are answered locally, with no call."""

    def __init__(self, settings: ProviderSettings, client: ProviderHttp):
        self.settings, self.client = settings, client

    async def check(self, provider: Provider, api_key: str) -> KeyVerdict:
        api_key = providers.normalize_key(api_key)
        if problem := providers.key_shape_problem(provider, api_key):
            return providers.malformed(provider, problem)
        try:
            response = await providers.list_models(self.client, self.settings, provider, api_key)
        except ProviderUnreachable as exc:
            if exc.timed_out:
                return providers.unavailable(provider, "did not answer in time")
            return providers.unavailable(provider, f"could not be reached ({exc.kind})")
        if response.status_code < 300:
            return providers.valid(provider)
        return providers.classify_error(provider, response.status_code, response.content, response.headers)
