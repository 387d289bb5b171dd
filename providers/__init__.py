"""What this system knows about each LLM provider's HTTP API: one module per provider behind one
protocol (`base.ProviderApi`), found through `registry.REGISTRY` by `schemas.events.Provider`.

| module | what |
|---|---|
| `base.py` | the protocol, `ProviderBase` (key-shape check and user messages), `KeyVerdict`, `ChatReply`, `ProviderError`, `SseDecoder` / `StreamPiece` (streams), pure helpers |
| `openai.py`, `anthropic.py`, `groq.py`, `gemini.py` | each provider: key shape, models (catalog and prefixes), base-URL and platform-key settings, paths, auth headers, chat body and reply, stream body and events, error classification |
| `registry.py` | `REGISTRY`, `of(provider)`, `owner_of(key)`, `models()` (the catalog), `provider_of_model(model)`, `key_pattern()` (what logs mask), `ProviderSettings` (base URLs), `PlatformKeySettings` (the platform's keys) |
| `client.py` | `list_models`, `chat_completion` and `chat_stream` over the caller's HTTP client (the `ProviderHttp` port, with `post_stream`) |

The functions below take a `Provider` (or its value) and ask its module; the services use them.
Everything is pure except the calls of `client.py`. It imports `schemas` only (the import rule in
pyproject.toml); the HTTP client with its retry is plumbing, in `services.shared.provider_http`.
A key is never put in an exception message, a log line or a repr by this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic_settings import BaseSettings

from providers.base import (
    MAX_KEY_LENGTH,
    ChatReply,
    ErrorBody,
    InvalidModelId,
    KeyVerdict,
    Messages,
    ProviderApi,
    ProviderError,
    model_segment,
    normalize_key,
)
from providers.client import HttpStream, ProviderUnreachable, chat_completion, chat_stream, list_models
from providers.registry import (
    REGISTRY,
    PlatformKeySettings,
    ProviderSettings,
    key_pattern,
    models,
    of,
    owner_of,
    provider_of_model,
)
from schemas.events import KeyCheckStatus, Provider

__all__ = [
    "MAX_KEY_LENGTH",
    "REGISTRY",
    "ChatReply",
    "HttpStream",
    "InvalidModelId",
    "KeyVerdict",
    "PlatformKeySettings",
    "ProviderApi",
    "ProviderError",
    "ProviderSettings",
    "ProviderUnreachable",
    "auth_headers",
    "call_failed",
    "chat_body",
    "chat_completion",
    "chat_path",
    "chat_stream",
    "classify_error",
    "key_hint",
    "key_pattern",
    "key_shape_problem",
    "list_models",
    "malformed",
    "model_segment",
    "models",
    "models_path",
    "normalize_key",
    "of",
    "owner_of",
    "parse_chat_reply",
    "provider_of_model",
    "unavailable",
    "valid",
]


def key_shape_problem(provider: Provider | str, api_key: str) -> str | None:
    """None when `api_key` (normalized) looks like a `provider` key, else a message saying what is wrong.

    Purely local: a key that fails here is answered `malformed` without any network call.
    """
    return of(provider).key_shape_problem(api_key, owner_of(api_key))


def key_hint(api_key: str) -> str | None:
    """The shown form of a key: its well-known prefix and last four characters (`sk-…a1b2`).

    None for a key too short to hint at without giving most of it away. The only form of a key that
    may be shown, logged or stored.
    """
    api_key = normalize_key(api_key)
    if len(api_key) < 16:
        return None
    owner = owner_of(api_key)
    prefix = (owner.key_prefix_of(api_key) if owner else None) or ""
    return f"{prefix}…{api_key[-4:]}"


def models_path(provider: Provider | str) -> str:
    """The provider's real model-list path, relative to its base URL."""
    return of(provider).models_path()


def chat_path(provider: Provider | str, model: str) -> str:
    """The provider's real (non-streaming) chat path, relative to its base URL."""
    return of(provider).chat_path(model)


def auth_headers(provider: Provider | str, api_key: str, settings: BaseSettings | None = None) -> dict[str, str]:
    """The request headers that authenticate `api_key` with `provider`."""
    return of(provider).auth_headers(api_key, settings)


def chat_body(provider: Provider | str, model: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
    """The provider's request body for `messages` ([{role, content}], roles user/assistant/system)."""
    return of(provider).chat_body(model, messages, max_tokens)


def parse_chat_reply(provider: Provider | str, model: str, body: Mapping[str, Any]) -> ChatReply:
    """Text and token usage from a provider's successful chat answer."""
    return of(provider).parse_chat_reply(model, body)


def classify_error(
    provider: Provider | str,
    http_status: int,
    body: ErrorBody,
    headers: Mapping[str, str] | None = None,
    *,
    call: bool = False,
) -> KeyVerdict:
    """Map a provider's non-2xx answer (status, error body, headers) to a verdict on the key.

    Works for the model-list check and for chat calls alike (`call=True` words an unavailable
    provider as a failed call, not as a check that could not be made). Unknown 4xx answers are
    reported as `provider_unavailable` with the provider's status, never as `invalid`: only an
    explicit authentication refusal condemns a key.
    """
    return of(provider).classify_error(http_status, body, headers, call=call)


def valid(provider: Provider | str) -> KeyVerdict:
    return of(provider).valid()


def malformed(provider: Provider | str, problem: str) -> KeyVerdict:
    return KeyVerdict(KeyCheckStatus.MALFORMED, problem)


def unavailable(provider: Provider | str, reason: str = "did not answer in time") -> KeyVerdict:
    """A key check the provider could not answer (timeout, network, 5xx): never a verdict on the key."""
    return of(provider).unavailable(reason)


def call_failed(provider: Provider | str, reason: str = "did not answer in time") -> KeyVerdict:
    """A call the provider could not answer (timeout, network, 5xx): the call did not complete; never a
    verdict on the key."""
    return of(provider).call_failed(reason)
