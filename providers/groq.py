"""Groq: OpenAI's API (auth, bodies, error format) under `/openai/v1` of its own host."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from providers.openai import OpenAI
from schemas.events import Provider


class GroqSettings(BaseSettings):
    """`GROQ_BASE_URL`: the bare host, as in Groq's SDK."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    groq_base_url: str = "https://api.groq.com"


class Groq(OpenAI):
    provider = Provider.GROQ
    name = "Groq"
    key_prefixes = ("gsk_",)
    key_charset = r"[A-Za-z0-9]"
    key_min_length = 20
    model_prefixes = ("llama", "gemma", "qwen", "deepseek", "mistral", "mixtral")
    keys_url = "https://console.groq.com/keys"
    billing_url = "https://console.groq.com/settings/billing"
    base_url_setting = "groq_base_url"

    def models_path(self) -> str:
        return "/openai/v1/models"

    def chat_path(self, model: str) -> str:
        return "/openai/v1/chat/completions"


API = Groq()
