"""The providers this system speaks to, by `schemas.events.Provider`, and their settings.

Everything the rest of the system knows about a provider is read from here, from its module: the
catalog (`models`), which models are whose (`provider_of_model`), whose a key is (`owner_of`), what the
logs mask (`key_pattern`), the base URLs (`ProviderSettings`) and the platform's own keys
(`PlatformKeySettings`). Adding a provider: its module (`providers/<name>.py`, with its `API`, its
settings class and its platform-key class), one entry in `REGISTRY`, and those two classes among the
bases of `ProviderSettings` and `PlatformKeySettings` below.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from providers import anthropic, gemini, groq, openai
from providers.base import ProviderApi
from schemas.events import Provider

REGISTRY: Mapping[Provider, ProviderApi] = {
    Provider.OPENAI: openai.API,
    Provider.ANTHROPIC: anthropic.API,
    Provider.GROQ: groq.API,
    Provider.GEMINI: gemini.API,
}


def of(provider: Provider | str) -> ProviderApi:
    """The implementation of `provider` (a `Provider` or its value; ValueError for an unknown one)."""
    return REGISTRY[Provider(provider)]


def owner_of(api_key: str) -> ProviderApi | None:
    """The provider whose key prefix `api_key` carries: the longest match, since Anthropic's `sk-ant-`
    starts with OpenAI's `sk-`. None when no provider's prefix fits."""
    matches = [
        (len(prefix), api) for api in REGISTRY.values() for prefix in api.key_prefixes if api_key.startswith(prefix)
    ]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def models() -> dict[Provider, tuple[str, ...]]:
    """The catalog: each provider's offered models (its module's `models`), in the registry's order."""
    return {provider: api.models for provider, api in REGISTRY.items()}


def provider_of_model(model: str) -> Provider | None:
    """The provider a model id belongs to, or None: the one whose catalog or hosted models name it
    exactly, else the one whose model prefix it carries (`gpt-…` OpenAI, `claude…` Anthropic, …).

    Prefixes do not overlap between providers (a test holds them to it), so at most one fits.
    """
    for api in REGISTRY.values():
        if model in api.models or model in api.hosted_models:
            return api.provider
    matches = [
        (len(prefix), api.provider)
        for api in REGISTRY.values()
        for prefix in api.model_prefixes
        if model.startswith(prefix)
    ]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def key_pattern() -> re.Pattern[str]:
    """Anything shaped like a key of any registered provider (also cut short): what the logs mask."""
    return _compiled(tuple(api.key_pattern() for api in REGISTRY.values()))


@functools.lru_cache(maxsize=16)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


class ProviderSettings(openai.OpenAISettings, anthropic.AnthropicSettings, groq.GroqSettings, gemini.GeminiSettings):
    """Every provider's settings (env `OPENAI_BASE_URL`, ...); the defaults are the real providers.

    Each base URL follows the provider SDK's convention (OpenAI's includes `/v1`; the others are the
    bare host), and the provider's real paths are appended to it.
    """

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    def base_url(self, provider: Provider | str) -> str:
        return of(provider).base_url(self)

    def models_url(self, provider: Provider | str) -> str:
        """URL of the provider's model list: the cheapest authenticated call that proves a key."""
        api = of(provider)
        return api.base_url(self) + api.models_path()

    def chat_url(self, provider: Provider | str, model: str) -> str:
        api = of(provider)
        return api.base_url(self) + api.chat_path(model)

    def stream_url(self, provider: Provider | str, model: str) -> str:
        """URL of the provider's streaming chat call."""
        api = of(provider)
        return api.base_url(self) + api.stream_path(model)


class PlatformKeySettings(
    openai.OpenAIPlatformKey, anthropic.AnthropicPlatformKey, groq.GroqPlatformKey, gemini.GeminiPlatformKey
):
    """The platform's own key for each provider (env `OPENAI_API_KEY`, ...), for the service that calls
    on the platform's account (the chat). The defaults are dummies the local simulator accepts; outside
    development every one must be set (`SECRETS`, see `services.shared.settings.refuse_default_secrets`),
    to the real key or to an empty value for a provider the platform does not offer."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")
    SECRETS: ClassVar[tuple[str, ...]] = tuple(api.api_key_setting for api in REGISTRY.values())

    def platform_keys(self) -> dict[Provider, str | None]:
        """The platform's key for each registered provider (None or '' where it has none)."""
        return {provider: getattr(self, api.api_key_setting, None) for provider, api in REGISTRY.items()}
