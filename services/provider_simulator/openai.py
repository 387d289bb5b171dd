"""OpenAI as the simulator speaks it: `Authorization: Bearer`, `/v1/models`, `/v1/chat/completions`
(with `stream: true` a `text/event-stream` of `chat.completion.chunk` objects ending in `data: [DONE]`,
usage in a last chunk with empty `choices` when `stream_options.include_usage` is true), and OpenAI's
error bodies (`{"error": {"message", "type", "param", "code"}}`, in a stream as a `data:` event)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.provider_simulator.base import (
    Answer,
    EventStream,
    Frame,
    Gate,
    Json,
    reply_text,
    sse,
    stream_pieces,
    stream_script,
    tokens,
)
from services.provider_simulator.state import Rule


def error(
    status: int, message: str, type_: str, code: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status, headers=headers
    )


def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    return value[7:].strip() or None if value.lower().startswith("bearer ") else None


def no_key() -> JSONResponse:
    return error(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        "invalid_request_error",
        None,
    )


class OpenAI:
    """OpenAI; also the API Groq copies (see `groq.py`), which differs only in the words below."""

    name = "openai"
    display_name = "OpenAI"
    mount = "/openai"
    base_url_env = "OPENAI_BASE_URL"
    base_url_path = "/openai/v1"
    api_prefix = "/v1"  # below the mount
    models = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o3-mini", "gpt-5.2-pro"]
    invalid_key_message = "Incorrect API key provided: sk-...****. You can find your API key at https://platform.openai.com/account/api-keys."
    denied_code = "unsupported_country_region_territory"

    def refusal(self, rule: Rule) -> JSONResponse | None:
        b = rule.behaviour
        if b == "invalid":
            return error(401, self.invalid_key_message, "invalid_request_error", "invalid_api_key")
        if b == "revoked":
            return error(
                401,
                "This key is associated with a deactivated account. If you feel this is an error, "
                "contact us through our help center.",
                "invalid_request_error",
                "account_deactivated",
            )
        if b == "denied":
            return error(
                403,
                f"You are not allowed to use this {self.display_name} API with this key: the project or "
                "organization does not have permission.",
                "invalid_request_error",
                self.denied_code,
            )
        if b == "no_quota":
            return error(
                429,
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                "insufficient_quota",
                "insufficient_quota",
            )
        if b == "rate_limited":
            return error(
                429,
                "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
                "requests",
                "rate_limit_exceeded",
                headers={"retry-after": "20", "x-ratelimit-remaining-requests": "0"},
            )
        if b == "down":
            status = rule.status or 503
            return error(
                status,
                "The server is overloaded or not ready yet."
                if status == 503
                else "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
            )
        return None

    def router(self, gate: Gate) -> APIRouter:
        router = APIRouter(prefix=self.api_prefix)

        @router.get("/models", response_model=None)
        async def models(request: Request) -> Answer:
            key = bearer(request)
            if isinstance(admitted := await gate(self.name, key, "models"), JSONResponse):
                return admitted
            if not key:
                return no_key()
            return {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1700000000, "owned_by": self.name} for m in self.models
                ],
            }

        @router.post("/chat/completions", response_model=None)
        async def chat(request: Request) -> Answer:
            key = bearer(request)
            try:
                body = await request.json()
            except Exception:
                body = None
            streamed = isinstance(body, dict) and body.get("stream") is True
            if isinstance(admitted := await gate(self.name, key, "stream" if streamed else "chat"), JSONResponse):
                return admitted
            if not key:
                return no_key()
            try:
                model, messages = body["model"], body["messages"]
                prompt = " ".join(str(m.get("content", "")) for m in messages)
                said = str(messages[-1].get("content", "")) if messages else ""
            except Exception:
                return error(400, "We could not parse the JSON body of your request.", "invalid_request_error", None)
            text = reply_text(model, said)
            if streamed:
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return EventStream(
                    self.stream_frames(admitted, model, prompt, text, include_usage),
                    fails=admitted.behaviour == "stream_fail",
                )
            usage = {"prompt_tokens": tokens(prompt), "completion_tokens": tokens(text)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            }

        return router

    # --- streams ---

    def stream_frames(self, rule: Rule, model: str, prompt: str, text: str, include_usage: bool) -> list[Frame]:
        pieces = stream_pieces(text, rule)
        full = "".join(pieces)
        usage = {"prompt_tokens": tokens(prompt), "completion_tokens": tokens(full)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_sim",
        }
        # With include_usage every chunk has `usage: null`, and the last one the usage.
        extra: dict[str, Any] = {"usage": None} if include_usage else {}

        def chunk(delta: Json, finish_reason: str | None = None, **more: Any) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse({**base, "choices": [choice], **extra, **more})

        request_id = f"req_{uuid.uuid4().hex[:26]}"
        head = [chunk({"role": "assistant", "content": "", "refusal": None}, **self.first_chunk_extra(request_id))]
        tail = [chunk({}, "stop", **self.last_chunk_extra(request_id, usage))]
        if include_usage:
            tail.append(sse({**base, "choices": [], "usage": usage, **self.usage_chunk_extra(request_id, usage)}))
        tail.append(sse("[DONE]"))
        error_event = sse(
            {
                "error": {
                    "message": "The server had an error while processing your request. Sorry about that!",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )
        return stream_script(
            rule, pieces, head=head, delta=lambda piece: chunk({"content": piece}), tail=tail, error=error_event
        )

    def first_chunk_extra(self, request_id: str) -> Json:
        """What a provider adds to the first chunk (Groq: `x_groq.id`)."""
        return {}

    def last_chunk_extra(self, request_id: str, usage: dict[str, int]) -> Json:
        """What a provider adds to the chunk with the finish reason (Groq: `x_groq.usage`)."""
        return {}

    def usage_chunk_extra(self, request_id: str, usage: dict[str, int]) -> Json:
        """What a provider adds to the include_usage chunk."""
        return {}
