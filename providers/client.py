"""The two calls this system makes to a provider, over the caller's HTTP client (`ProviderHttp`).

The client is a port: the services pass `services.shared.provider_http.ProviderClient` (aiohttp, with
pooling, timeouts and the retry of a stale connection); tests may pass an in-process adapter. This
module names no HTTP library, so the provider rules stay free of transport details.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from providers.base import ChatReply, Messages, ProviderError
from providers.registry import ProviderSettings, of
from schemas.events import Provider


@dataclass(frozen=True)
class HttpAnswer:
    """A provider's answer: status, raw body and headers (case-insensitive in every adapter)."""

    status_code: int
    content: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.content)


class ProviderUnreachable(Exception):
    """No answer from the provider: a timeout (`timed_out`) or a network failure. Never a verdict on
    the key. The message names the failure's kind, never a URL or a header."""

    def __init__(self, kind: str, timed_out: bool = False):
        super().__init__(kind)
        self.kind, self.timed_out = kind, timed_out


class ProviderHttp(Protocol):
    """Port: one HTTP request to a provider; raises `ProviderUnreachable` when no answer came."""

    async def get(self, url: str, headers: Mapping[str, str]) -> HttpAnswer: ...

    async def post_json(self, url: str, headers: Mapping[str, str], body: Any) -> HttpAnswer: ...


async def list_models(
    client: ProviderHttp, settings: ProviderSettings, provider: Provider | str, api_key: str
) -> HttpAnswer:
    """GET the provider's model list with `api_key`: the cheapest authenticated call that proves a key."""
    api = of(provider)
    return await client.get(settings.models_url(api.provider), headers=api.auth_headers(api_key, settings))


async def chat_completion(
    client: ProviderHttp,
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
        response = await client.post_json(
            settings.chat_url(api.provider, model),
            headers=api.auth_headers(api_key, settings),
            body=api.chat_body(model, messages, max_tokens),
        )
    except ProviderUnreachable as exc:
        reason = "did not answer in time" if exc.timed_out else f"could not be reached ({exc.kind})"
        raise ProviderError(api.provider, api.unavailable(reason)) from None
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
