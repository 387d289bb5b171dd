"""OpenAI as the simulator speaks it: `Authorization: Bearer`, `/v1/models`, `/v1/chat/completions`,
and OpenAI's error bodies (`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.provider_simulator.base import Gate, reply_text, tokens
from services.provider_simulator.state import Rule


def error(status: int, message: str, type_: str, code: str | None, headers: dict | None = None) -> JSONResponse:
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

        @router.get("/models")
        async def models(request: Request):
            key = bearer(request)
            if (refused := await gate(self.name, key, "models")) is not None:
                return refused
            if not key:
                return no_key()
            return {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1700000000, "owned_by": self.name} for m in self.models
                ],
            }

        @router.post("/chat/completions")
        async def chat(request: Request):
            key = bearer(request)
            if (refused := await gate(self.name, key, "chat")) is not None:
                return refused
            if not key:
                return no_key()
            try:
                body = await request.json()
                model, messages = body["model"], body["messages"]
                prompt = " ".join(str(m.get("content", "")) for m in messages)
                said = str(messages[-1].get("content", "")) if messages else ""
            except Exception:
                return error(400, "We could not parse the JSON body of your request.", "invalid_request_error", None)
            text = reply_text(model, said)
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
