"""Groq: OpenAI's API (auth, bodies, error format) under `/openai/v1` of its own host."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers.base import SseEvent, StreamPiece, json_object
from providers.openai import OpenAI
from schemas.events import Provider


class GroqSettings(BaseSettings):
    """`GROQ_BASE_URL`: the bare host, as in Groq's SDK."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    groq_base_url: str = "https://api.groq.com"


class GroqPlatformKey(BaseSettings):
    """`GROQ_API_KEY`: the platform's own key; the default is a dummy the local simulator accepts."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    groq_api_key: str | None = Field(default="gsk_localsimulatorvalidplatform0001", repr=False)


class Groq(OpenAI):
    provider = Provider.GROQ
    name = "Groq"
    key_prefixes = ("gsk_",)
    key_charset = r"[A-Za-z0-9]"
    key_min_length = 20
    # Open-weight families Groq runs under their makers' names; `mistral` is not among them: it is
    # the naming of Mistral's own API (a provider of its own), so the Mistral models Groq runs are
    # claimed by exact id below.
    model_prefixes = ("llama", "gemma", "qwen", "deepseek", "mixtral")
    models = (
        "llama3-8b-8192",
        "llama-3.3-70b-versatile",
        "gemma2-9b-it",
        "qwen-qwq-32b",
        "deepseek-r1-distill-llama-70b",
    )
    hosted_models = ("mistral-saba-24b",)
    keys_url = "https://console.groq.com/keys"
    billing_url = "https://console.groq.com/settings/billing"
    base_url_setting = "groq_base_url"
    api_key_setting = "groq_api_key"

    def models_path(self) -> str:
        return "/openai/v1/models"

    def chat_path(self, model: str) -> str:
        return "/openai/v1/chat/completions"

    def parse_stream_event(self, event: SseEvent) -> StreamPiece:
        # Groq says why it stopped a stream early in `x_groq.error` of a chunk, besides OpenAI's
        # `{"error": {...}}` event.
        if event.data and event.data.strip() != "[DONE]":
            reason = (json_object(event.data).get("x_groq") or {}).get("error")
            if reason:
                return StreamPiece(error={"error": {"message": str(reason), "type": "server_error", "code": None}})
        return super().parse_stream_event(event)

    def stream_usage(self, chunk: Mapping[str, Any]) -> Mapping[str, Any] | None:
        # Groq puts the stream's usage in the final chunk's `x_groq.usage`; with `include_usage` it
        # also sends OpenAI's usage chunk. Either will do (they agree).
        usage = super().stream_usage(chunk)
        if usage is None:
            x_groq = chunk.get("x_groq")
            usage = x_groq.get("usage") if isinstance(x_groq, Mapping) else None
        return usage if isinstance(usage, Mapping) else None


API = Groq()
