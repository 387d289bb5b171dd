"""The two calls this system makes to a provider, over the caller's `httpx.AsyncClient` (the caller
owns pooling, timeouts and the retry of a stale connection: `services.shared.provider_http`)."""

from __future__ import annotations

import httpx

from providers.base import ChatReply, Messages, ProviderError
from providers.registry import ProviderSettings, of
from schemas.events import Provider


async def list_models(
    client: httpx.AsyncClient, settings: ProviderSettings, provider: Provider | str, api_key: str
) -> httpx.Response:
    """GET the provider's model list with `api_key`: the cheapest authenticated call that proves a key."""
    api = of(provider)
    return await client.get(settings.models_url(api.provider), headers=api.auth_headers(api_key, settings))


async def chat_completion(
    client: httpx.AsyncClient,
    settings: ProviderSettings,
    provider: Provider | str,
    api_key: str,
    model: str,
    messages: Messages,
    *,
    max_tokens: int = 1024,
) -> ChatReply:
    """One non-streaming chat call. Raises `ProviderError` on any failure (timeouts and network
    errors become `provider_unavailable`)."""
    api = of(provider)
    try:
        response = await client.post(
            settings.chat_url(api.provider, model),
            headers=api.auth_headers(api_key, settings),
            json=api.chat_body(model, messages, max_tokens),
        )
    except httpx.TimeoutException:
        raise ProviderError(api.provider, api.unavailable("did not answer in time")) from None
    except httpx.HTTPError as exc:
        raise ProviderError(api.provider, api.unavailable(f"could not be reached ({type(exc).__name__})")) from None
    if response.status_code >= 400:
        raise ProviderError(
            api.provider,
            api.classify_error(response.status_code, response.content, response.headers),
            response.status_code,
        )
    try:
        return api.parse_chat_reply(model, response.json())
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ProviderError(
            api.provider, api.unavailable("sent an answer we could not read"), response.status_code
        ) from None
