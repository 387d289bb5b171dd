"""Anthropic as the simulator speaks it: `x-api-key` plus a required `anthropic-version`, `/v1/models`,
`/v1/messages`, and Anthropic's error bodies (`{"type": "error", "error": {"type", "message"}, "request_id"}`)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.provider_simulator.base import Gate, reply_text, tokens
from services.provider_simulator.state import Rule


def error(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"type": "error", "error": {"type": type_, "message": message}, "request_id": f"req_{uuid.uuid4().hex[:24]}"},
        status_code=status,
        headers=headers,
    )


def precheck(request: Request) -> JSONResponse | None:
    if not request.headers.get("x-api-key"):
        return error(401, "authentication_error", "x-api-key header is required")
    if not request.headers.get("anthropic-version"):
        return error(400, "invalid_request_error", "anthropic-version: header is required")
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

        @router.get("/models")
        async def models(request: Request):
            key = request.headers.get("x-api-key")
            if (refused := await gate(self.name, key, "models")) is not None:
                return refused
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

        @router.post("/messages")
        async def messages(request: Request):
            key = request.headers.get("x-api-key")
            if (refused := await gate(self.name, key, "chat")) is not None:
                return refused
            if (refused := precheck(request)) is not None:
                return refused
            try:
                body = await request.json()
                model, messages, max_tokens = body["model"], body["messages"], int(body["max_tokens"])
                prompt = " ".join(str(m.get("content", "")) for m in messages) + " " + str(body.get("system", ""))
                said = str(messages[-1].get("content", "")) if messages else ""
            except Exception:
                return error(400, "invalid_request_error", "model, messages and max_tokens are required")
            text = reply_text(model, said)
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
