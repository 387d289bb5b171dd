"""Gemini (Google's Generative Language API): `x-goog-api-key`, the model in the chat path, and
Google's error format (`{"error": {"code", "message", "status", "details": [ErrorInfo, QuotaFailure]}}`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers.base import (
    IGNORED,
    ChatReply,
    ErrorFields,
    KeyVerdict,
    Messages,
    ProviderBase,
    SseEvent,
    StreamPiece,
    json_object,
    model_segment,
    token_count,
)
from schemas.events import Provider


class GeminiSettings(BaseSettings):
    """`GEMINI_BASE_URL`: the bare host."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    gemini_base_url: str = "https://generativelanguage.googleapis.com"


class GeminiPlatformKey(BaseSettings):
    """`GEMINI_API_KEY`: the platform's own key; the default is a dummy the local simulator accepts."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    gemini_api_key: str | None = Field(default="AIzaLocalSimulatorValidPlatform000000001", repr=False)


class Gemini(ProviderBase):
    provider = Provider.GEMINI
    name = "Gemini"
    key_prefixes = ("AIza",)
    key_charset = r"[A-Za-z0-9_\-]"
    key_min_length = 30
    model_prefixes = ("gemini",)
    # gemini-2.5-flash has no platform price: it runs only on the user's own key.
    models = ("gemini-2.5-pro", "gemini-2.5-flash")
    keys_url = "https://aistudio.google.com/app/apikey"
    billing_url = "https://aistudio.google.com/app/plan_information"
    base_url_setting = "gemini_base_url"
    api_key_setting = "gemini_api_key"

    def models_path(self) -> str:
        return "/v1beta/models"

    def chat_path(self, model: str) -> str:
        # The only provider with the model in the path: it must stay one path segment.
        return f"/v1beta/models/{model_segment(model)}:generateContent"

    def auth_headers(self, api_key: str, settings: BaseSettings | None = None) -> dict[str, str]:
        return {"x-goog-api-key": api_key}  # never `?key=`: a URL may end up in a log

    def chat_body(self, model: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        body: dict[str, Any] = {
            "contents": [
                {"role": "model" if m["role"] == "assistant" else "user", "parts": [{"text": m["content"]}]}
                for m in messages
                if m["role"] != "system"
            ],
            "generationConfig": {"maxOutputTokens": max_tokens},
        }
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        return body

    def parse_chat_reply(self, model: str, body: Mapping[str, Any]) -> ChatReply:
        usage = body.get("usageMetadata") or {}
        parts = (body.get("candidates") or [{}])[0].get("content", {}).get("parts", [])
        text = "".join(p.get("text", "") for p in parts)
        return ChatReply(
            text,
            int(usage.get("promptTokenCount", 0)),
            int(usage.get("candidatesTokenCount", 0)),
            body.get("modelVersion", model),
        )

    # --- streaming: `:streamGenerateContent?alt=sse`, each event a GenerateContentResponse ---

    def stream_path(self, model: str) -> str:
        return f"/v1beta/models/{model_segment(model)}:streamGenerateContent?alt=sse"

    def stream_body(self, model: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
        return self.chat_body(model, messages, max_tokens)  # the path, not the body, asks for a stream

    def parse_stream_event(self, event: SseEvent) -> StreamPiece:
        if not event.data:
            return IGNORED
        chunk = json_object(event.data)
        if chunk.get("error"):
            return StreamPiece(error=chunk)
        candidate = (chunk.get("candidates") or [{}])[0]
        text = "".join(str(p.get("text", "")) for p in (candidate.get("content") or {}).get("parts") or [])
        usage = chunk.get("usageMetadata") or {}
        return StreamPiece(
            text=text,
            input_tokens=token_count(usage.get("promptTokenCount")),
            output_tokens=token_count(usage.get("candidatesTokenCount")),
            model=chunk.get("modelVersion"),
            # No end marker: the chunk whose candidate has a finish reason is the last one.
            done=bool(candidate.get("finishReason")),
        )

    def stream_error_status(self, error: ErrorFields) -> int:
        return int(error.code) if error.code.isdigit() else 500  # Google's errors carry their HTTP code

    def classify_refusal(self, http_status: int, error: ErrorFields, retry_after_s: float | None) -> KeyVerdict | None:
        kind, message, reasons = error.kind, error.message.lower(), error.reasons
        if "API_KEY_EXPIRED" in reasons or (http_status == 400 and "expired" in message):
            return self.revoked()
        if "API_KEY_INVALID" in reasons or (http_status == 400 and "api key not valid" in message):
            return self.invalid()
        if http_status == 429 or kind == "RESOURCE_EXHAUSTED":
            # Gemini words both cases alike ("You exceeded your current quota..."); only the violated
            # quota tells them apart: a per-day quota will not come back within minutes.
            if "PerDay" in error.quota_ids:
                return self.quota_exhausted()
            return self.rate_limited(retry_after_s)
        if "BILLING_DISABLED" in reasons:
            return self.quota_exhausted()
        if http_status in (401, 403) or kind in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            return self.denied()
        return None


API = Gemini()
