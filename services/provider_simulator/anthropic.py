"""Anthropic as the simulator speaks it: the key in `x-api-key` or, as the current SDK sends it, in
`Authorization: Bearer`, plus a required `anthropic-version` (a date: the SDK's own is newer than
ours), `/v1/models`, `/v1/messages` (with `stream: true` named events: `message_start`,
`content_block_start`, `ping`, `content_block_delta`, `content_block_stop`, `message_delta`,
`message_stop`; a failure midway is an `error` event), and Anthropic's error bodies
(`{"type": "error", "error": {"type", "message"}, "request_id"}`)."""

from __future__ import annotations

import re
import uuid

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


def error(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"type": "error", "error": {"type": type_, "message": message}, "request_id": f"req_{uuid.uuid4().hex[:24]}"},
        status_code=status,
        headers=headers,
    )


def api_key(request: Request) -> str | None:
    """The key: `x-api-key`, else a bearer token (the SDK sends an API key that way too)."""
    if key := request.headers.get("x-api-key"):
        return key
    value = request.headers.get("authorization", "")
    return value[7:].strip() or None if value.lower().startswith("bearer ") else None


def precheck(request: Request) -> JSONResponse | None:
    if not api_key(request):
        return error(401, "authentication_error", "x-api-key header is required")
    version = request.headers.get("anthropic-version")
    if not version:
        return error(400, "invalid_request_error", "anthropic-version: header is required")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", version):
        return error(400, "invalid_request_error", f"anthropic-version: invalid version {version!r}")
    return None


class Anthropic:
    name = "anthropic"
    mount = "/anthropic"
    base_url_env = "ANTHROPIC_BASE_URL"
    base_url_path = "/anthropic"
    models = ["claude-sonnet-4", "claude-3-7-sonnet", "claude-3-5-sonnet", "claude-3-5-haiku", "claude-opus-4"]

    def refusal(self, rule: Rule) -> JSONResponse | None:
        b = rule.behaviour
        if b == "invalid":
            return error(401, "authentication_error", "invalid x-api-key")
        if b == "revoked":
            return error(401, "authentication_error", "This API key has been disabled.")
        if b == "denied":
            return error(
                403, "permission_error", "Your API key does not have permission to use the specified resource."
            )
        if b == "no_quota":
            return error(
                400,
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic "
                "API. Please go to Plans & Billing to upgrade or purchase credits.",
            )
        if b == "rate_limited":
            return error(
                429,
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit.",
                headers={"retry-after": "15"},
            )
        if b == "down":
            status = rule.status or 529
            return error(
                status,
                "overloaded_error" if status == 529 else "api_error",
                "Overloaded" if status == 529 else "Internal server error",
            )
        return None

    def router(self, gate: Gate) -> APIRouter:
        router = APIRouter(prefix="/v1")

        @router.get("/models", response_model=None)
        async def models(request: Request) -> Answer:
            if isinstance(admitted := await gate(self.name, api_key(request), "models"), JSONResponse):
                return admitted
            if (refused := precheck(request)) is not None:
                return refused
            data = [
                {
                    "type": "model",
                    "id": m,
                    "display_name": m.replace("-", " ").title(),
                    "created_at": "2025-05-22T00:00:00Z",
                }
                for m in self.models
            ]
            return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}

        @router.post("/messages", response_model=None)
        async def messages(request: Request) -> Answer:
            try:
                body = await request.json()
            except Exception:
                body = None
            streamed = isinstance(body, dict) and body.get("stream") is True
            endpoint = "stream" if streamed else "chat"
            if isinstance(admitted := await gate(self.name, api_key(request), endpoint), JSONResponse):
                return admitted
            if (refused := precheck(request)) is not None:
                return refused
            try:
                model, messages, max_tokens = body["model"], body["messages"], int(body["max_tokens"])
                prompt = " ".join(str(m.get("content", "")) for m in messages) + " " + str(body.get("system", ""))
                said = str(messages[-1].get("content", "")) if messages else ""
            except Exception:
                return error(400, "invalid_request_error", "model, messages and max_tokens are required")
            text = reply_text(model, said)
            if streamed:
                return EventStream(
                    self.stream_frames(admitted, model, prompt, text, max_tokens),
                    fails=admitted.behaviour == "stream_fail",
                )
            return {
                "id": f"msg_{uuid.uuid4().hex[:24]}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": tokens(prompt), "output_tokens": min(max_tokens, tokens(text))},
            }

        return router

    def stream_frames(self, rule: Rule, model: str, prompt: str, text: str, max_tokens: int) -> list[Frame]:
        pieces = stream_pieces(text, rule)
        message: Json = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": tokens(prompt), "output_tokens": 1},
        }
        head = [
            sse({"type": "message_start", "message": message}, "message_start"),
            sse(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            ),
            sse({"type": "ping"}, "ping"),
        ]
        output_tokens = min(max_tokens, tokens("".join(pieces)))
        tail = [
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
                "message_delta",
            ),
            sse({"type": "message_stop"}, "message_stop"),
        ]
        error_event = sse(
            {
                "type": "error",
                "error": {"type": "overloaded_error", "message": "Overloaded"},
                "request_id": f"req_{uuid.uuid4().hex[:24]}",
            },
            "error",
        )
        return stream_script(
            rule,
            pieces,
            head=head,
            delta=lambda piece: sse(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                "content_block_delta",
            ),
            tail=tail,
            error=error_event,
        )
