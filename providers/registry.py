"""The providers this system speaks to, by `schemas.events.Provider`, and their settings.

Adding a provider: its module (`providers/<name>.py`, with its `API` and its settings class), one
entry in `REGISTRY` and one base of `ProviderSettings` below.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def provider_of_model(model: str) -> Provider | None:
    """The provider a model id belongs to by its name (`gpt-…` OpenAI, `claude…` Anthropic, …), or None.

    A guess for old clients that do not say; the longest matching prefix wins.
    """
    matches = [
        (len(prefix), api.provider)
        for api in REGISTRY.values()
        for prefix in api.model_prefixes
        if model.startswith(prefix)
    ]
    return max(matches, key=lambda m: m[0])[1] if matches else None


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
