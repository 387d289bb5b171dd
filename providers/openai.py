"""OpenAI: `Authorization: Bearer`, `/v1/chat/completions`, and OpenAI's error format
(`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

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

# A restricted key lacking a scope answers 401 "You have insufficient permissions ... Missing scopes".
PERMISSION_WORDS = re.compile(r"permission|not allowed|missing scopes", re.I)


class OpenAISettings(BaseSettings):
    """`OPENAI_BASE_URL`: as in OpenAI's SDK, it includes `/v1`."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    openai_base_url: str = "https://api.openai.com/v1"


class OpenAIPlatformKey(BaseSettings):
    """`OPENAI_API_KEY`: the platform's own key; the default is a dummy the local simulator accepts."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    openai_api_key: str | None = Field(default="sk-local-simulator-valid-platform-0001", repr=False)


class OpenAI(ProviderBase):
    """OpenAI's API; also the format other providers copy (see `providers/groq.py`)."""

    provider = Provider.OPENAI
    name = "OpenAI"
    # Annotated: Groq (a subclass) has other prefixes.
    key_prefixes: ClassVar[tuple[str, ...]] = ("sk-proj-", "sk-svcacct-", "sk-admin-", "sk-")
    key_charset = r"[A-Za-z0-9_\-]"
    key_min_length = 20
    model_prefixes: ClassVar[tuple[str, ...]] = ("gpt-", "o1", "o3", "o4", "chatgpt")
    models: ClassVar[tuple[str, ...]] = (
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "o3-mini",
        "o3",
        "gpt-5.2-pro",
    )
    keys_url = "https://platform.openai.com/api-keys"
    billing_url = "https://platform.openai.com/settings/organization/billing"
    base_url_setting = "openai_base_url"
    api_key_setting = "openai_api_key"

    def models_path(self) -> str:
        return "/models"

    def chat_path(self, model: str) -> str:
        return "/chat/completions"

    def auth_headers(self, api_key: str, settings: BaseSettings | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    def chat_body(self, model: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
        return {"model": model, "messages": [dict(m) for m in messages], "max_tokens": max_tokens}

    def parse_chat_reply(self, model: str, body: Mapping[str, Any]) -> ChatReply:
        usage = body.get("usage") or {}
        text = body["choices"][0]["message"].get("content") or ""
        return ChatReply(
            text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), body.get("model", model)
        )

    # --- streaming: `data: {chat.completion.chunk}` events, then `data: [DONE]` ---

    def stream_path(self, model: str) -> str:
        return self.chat_path(model)

    def stream_body(self, model: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
        # Without `include_usage` a stream carries no usage at all: the last chunk before [DONE] then
        # has empty `choices` and the whole call's `usage`.
        return {
            **self.chat_body(model, messages, max_tokens),
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    def parse_stream_event(self, event: SseEvent) -> StreamPiece:
        if not event.data:
            return IGNORED
        if event.data.strip() == "[DONE]":
            return StreamPiece(done=True)
        chunk = json_object(event.data)
        if chunk.get("error"):
            return StreamPiece(error=chunk)
        text = "".join(
            str((choice.get("delta") or {}).get("content") or "")
            for choice in chunk.get("choices") or []
            if choice.get("index", 0) == 0
        )
        usage = self.stream_usage(chunk) or {}
        return StreamPiece(
            text=text,
            input_tokens=token_count(usage.get("prompt_tokens")),
            output_tokens=token_count(usage.get("completion_tokens")),
            model=chunk.get("model"),
        )

    def stream_usage(self, chunk: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The usage a chunk carries (OpenAI: `usage`, in the last chunk when `include_usage` is asked)."""
        usage = chunk.get("usage")
        return usage if isinstance(usage, Mapping) else None

    def stream_error_status(self, error: ErrorFields) -> int:
        if error.code in ("rate_limit_exceeded", "insufficient_quota") or error.kind == "insufficient_quota":
            return 429
        if error.code == "invalid_api_key":
            return 401
        return 500  # `server_error` and anything else

    def classify_refusal(self, http_status: int, error: ErrorFields, retry_after_s: float | None) -> KeyVerdict | None:
        code, kind, message = error.code, error.kind, error.message
        if code == "insufficient_quota" or kind == "insufficient_quota":
            return self.quota_exhausted()
        if http_status == 429 or code == "rate_limit_exceeded":
            return self.rate_limited(retry_after_s)
        if http_status == 401 and PERMISSION_WORDS.search(message):
            return self.denied()  # a restricted key lacking a scope answers 401 "insufficient permissions"
        if code == "account_deactivated" or (http_status == 401 and REVOKED_WORDS.search(message)):
            return self.revoked()
        if http_status == 401 or code == "invalid_api_key":
            return self.invalid()
        if http_status == 403:
            return self.denied()
        return None


API = OpenAI()
