"""Anthropic: `x-api-key` plus a required `anthropic-version`, `/v1/messages`, and Anthropic's error
format (`{"type": "error", "error": {"type", "message"}}`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers.base import (
    IGNORED,
    REVOKED_WORDS,
    ChatReply,
    ErrorFields,
    KeyVerdict,
    Messages,
    ProviderBase,
    SseEvent,
    StreamPiece,
    json_object,
    token_count,
)
from schemas.events import Provider

ANTHROPIC_VERSION = "2023-06-01"
# Anthropic refuses a call of an account without credit with 400 invalid_request_error "Your credit
# balance is too low ...": only the words tell it from a malformed request.
QUOTA_WORDS = re.compile(r"quota|credit balance|billing|insufficient funds", re.I)
# The HTTP status each of Anthropic's error types comes with, for an error sent inside a stream.
ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class AnthropicSettings(BaseSettings):
    """`ANTHROPIC_BASE_URL` (the bare host, as in Anthropic's SDK) and `ANTHROPIC_VERSION`."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    anthropic_base_url: str = "https://api.anthropic.com"
    anthropic_version: str = ANTHROPIC_VERSION


class AnthropicPlatformKey(BaseSettings):
    """`ANTHROPIC_API_KEY`: the platform's own key; the default is a dummy the local simulator accepts."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    anthropic_api_key: str | None = Field(default="sk-ant-local-simulator-valid-platform-0001", repr=False)


class Anthropic(ProviderBase):
    provider = Provider.ANTHROPIC
    name = "Anthropic"
    key_prefixes = ("sk-ant-",)
    key_charset = r"[A-Za-z0-9_\-]"
    key_min_length = 20
    model_prefixes = ("claude",)
    models = ("claude-3-5-haiku", "claude-sonnet-4", "claude-3-7-sonnet", "claude-3-5-sonnet", "claude-opus-4")
    keys_url = "https://console.anthropic.com/settings/keys"
    billing_url = "https://console.anthropic.com/settings/billing"
    base_url_setting = "anthropic_base_url"
    api_key_setting = "anthropic_api_key"

    def models_path(self) -> str:
        return "/v1/models"

    def chat_path(self, model: str) -> str:
        return "/v1/messages"

    def auth_headers(self, api_key: str, settings: BaseSettings | None = None) -> dict[str, str]:
        version = settings.anthropic_version if isinstance(settings, AnthropicSettings) else ANTHROPIC_VERSION
        return {"x-api-key": api_key, "anthropic-version": version}

    def chat_body(self, model: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"],
        }
        if system:
            body["system"] = system
        return body

    def parse_chat_reply(self, model: str, body: Mapping[str, Any]) -> ChatReply:
        usage = body.get("usage") or {}
        text = "".join(part.get("text", "") for part in body.get("content", []) if part.get("type") == "text")
        return ChatReply(
            text, int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0)), body.get("model", model)
        )

    # --- streaming: named events, `message_start` ... `message_stop` ---

    def stream_path(self, model: str) -> str:
        return self.chat_path(model)

    def stream_body(self, model: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
        return {**self.chat_body(model, messages, max_tokens), "stream": True}

    def parse_stream_event(self, event: SseEvent) -> StreamPiece:
        if not event.data:
            return IGNORED
        data = json_object(event.data)
        kind = event.event or str(data.get("type", ""))
        if kind == "error":
            return StreamPiece(error=data)
        if kind == "message_start":
            message = data["message"]
            # Its `output_tokens` is a first count; `message_delta` says how many there were.
            return StreamPiece(
                input_tokens=token_count((message.get("usage") or {}).get("input_tokens")), model=message.get("model")
            )
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            return StreamPiece(text=str(delta.get("text") or "")) if delta.get("type") == "text_delta" else IGNORED
        if kind == "message_delta":
            usage = data.get("usage") or {}
            return StreamPiece(
                input_tokens=token_count(usage.get("input_tokens")),
                output_tokens=token_count(usage.get("output_tokens")),
            )
        if kind == "message_stop":
            return StreamPiece(done=True)
        return IGNORED  # ping, content_block_start / _stop, and event types added later

    def stream_error_status(self, error: ErrorFields) -> int:
        return ERROR_TYPE_STATUS.get(error.kind, 500)

    def classify_refusal(self, http_status: int, error: ErrorFields, retry_after_s: float | None) -> KeyVerdict | None:
        kind, message = error.kind, error.message
        if http_status == 401 or kind == "authentication_error":
            return self.revoked() if REVOKED_WORDS.search(message) else self.invalid()
        if http_status == 403 or kind == "permission_error":
            return self.denied()
        if http_status == 429 or kind == "rate_limit_error":
            return self.rate_limited(retry_after_s)
        if http_status in (400, 402) and QUOTA_WORDS.search(message):
            return self.quota_exhausted()
        return None


API = Anthropic()
