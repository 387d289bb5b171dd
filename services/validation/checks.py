"""The provider check: the cheapest authenticated call that proves a key (its model list)."""

from __future__ import annotations

import httpx

import providers
from providers import KeyVerdict, ProviderSettings
from schemas.events import Provider
from services.shared.provider_http import provider_http_client


def make_http_client(timeout_s: float, connect_timeout_s: float, max_connections: int = 100) -> httpx.AsyncClient:
    """The provider client: short timeouts; the one retry is `services.shared.provider_http.FreshConnectionRetry`'s."""
    return provider_http_client(
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        # Keep every connection alive: a burst of checks should not pay for new TCP connections.
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


class KeyChecker:
    """Asks a provider whether a key works. Malformed keys are answered locally, with no call."""

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient):
        self.settings, self.client = settings, client

    async def check(self, provider: Provider, api_key: str) -> KeyVerdict:
        api_key = providers.normalize_key(api_key)
        if problem := providers.key_shape_problem(provider, api_key):
            return providers.malformed(provider, problem)
        try:
            response = await providers.list_models(self.client, self.settings, provider, api_key)
        except httpx.TimeoutException:
            return providers.unavailable(provider, "did not answer in time")
        except httpx.HTTPError as exc:
            # The exception text may hold the URL but never the key (it travels in headers only).
            return providers.unavailable(provider, f"could not be reached ({type(exc).__name__})")
        if response.status_code < 300:
            return providers.valid(provider)
        return providers.classify_error(provider, response.status_code, response.content, response.headers)
