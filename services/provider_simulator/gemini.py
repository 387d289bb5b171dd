"""Gemini as the simulator speaks it: `x-goog-api-key` (or `?key=`), `/v1beta/models`,
`/v1beta/models/{model}:generateContent` and `:streamGenerateContent` (with `?alt=sse`, `data:`
events each a GenerateContentResponse, `usageMetadata` complete in the last, whose candidate has
the `finishReason`; without it, one JSON array of them), the same under `/v1` (where the current
google-genai SDK calls), and Google's error bodies (`{"error": {"code", "message", "status",
"details"}}` with `ErrorInfo`, `QuotaFailure` and `RetryInfo` details; in a stream, as a `data:` event)."""

from __future__ import annotations

import json
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

QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)


def error(status: int, grpc_status: str, message: str, details: list[Json] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": status, "message": message, "status": grpc_status, "details": details or []}},
        status_code=status,
    )


def error_info(reason: str) -> Json:
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }


def quota_failure(quota_id: str, retry_s: int | None) -> list[Json]:
    details = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": quota_id,
                }
            ],
        }
    ]
    if retry_s:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_s}s"})
    return details


def api_key(request: Request) -> str | None:
    return request.headers.get("x-goog-api-key") or request.query_params.get("key")


def no_key() -> JSONResponse:
    return error(
        403,
        "PERMISSION_DENIED",
        "Method doesn't allow unregistered callers (callers without "
        "established identity). Please use API Key or other form of "
        "API consumer identity to call this API.",
    )


class Gemini:
    name = "gemini"
    mount = "/gemini"
    base_url_env = "GEMINI_BASE_URL"
    base_url_path = "/gemini"
    models = ["gemini-2.5-pro", "gemini-2.5-flash"]

    def refusal(self, rule: Rule) -> JSONResponse | None:
        b = rule.behaviour
        if b == "invalid":
            return error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [error_info("API_KEY_INVALID")],
            )
        if b == "revoked":
            return error(
                400, "INVALID_ARGUMENT", "API key expired. Please renew the API key.", [error_info("API_KEY_EXPIRED")]
            )
        if b == "denied":
            return error(
                403, "PERMISSION_DENIED", "The caller does not have permission", [error_info("API_KEY_SERVICE_BLOCKED")]
            )
        if b == "no_quota":
            return error(
                429,
                "RESOURCE_EXHAUSTED",
                QUOTA_MESSAGE,
                quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier", None),
            )
        if b == "rate_limited":
            return error(
                429,
                "RESOURCE_EXHAUSTED",
                QUOTA_MESSAGE,
                quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", 30),
            )
        if b == "down":
            status = rule.status or 503
            return error(
                status,
                "UNAVAILABLE" if status == 503 else "INTERNAL",
                "The model is overloaded. Please try again later."
                if status == 503
                else "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
            )
        return None

    def router(self, gate: Gate) -> APIRouter:
        router = APIRouter()
        for version in ("/v1beta", "/v1"):
            router.include_router(self.version_router(gate), prefix=version)
        return router

    def version_router(self, gate: Gate) -> APIRouter:
        router = APIRouter()

        @router.get("/models", response_model=None)
        async def models(request: Request) -> Answer:
            key = api_key(request)
            if isinstance(admitted := await gate(self.name, key, "models"), JSONResponse):
                return admitted
            if not key:
                return no_key()
            return {
                "models": [
                    {
                        "name": f"models/{m}",
                        "version": "001",
                        "displayName": m,
                        "inputTokenLimit": 1048576,
                        "outputTokenLimit": 65536,
                        "supportedGenerationMethods": ["generateContent", "countTokens"],
                    }
                    for m in self.models
                ]
            }

        @router.post("/models/{model_action}", response_model=None)
        async def generate(model_action: str, request: Request) -> Answer:
            model, _, action = model_action.partition(":")
            if action not in ("generateContent", "streamGenerateContent"):
                return error(404, "NOT_FOUND", f"Method {action or '(none)'} not found")
            streamed = action == "streamGenerateContent"
            key = api_key(request)
            if isinstance(admitted := await gate(self.name, key, "stream" if streamed else "chat"), JSONResponse):
                return admitted
            if not key:
                return no_key()
            try:
                body = await request.json()
                prompt = " ".join(p.get("text", "") for c in body["contents"] for p in c.get("parts", []))
                last = body["contents"][-1].get("parts", []) if body["contents"] else []
                said = " ".join(p.get("text", "") for p in last)
            except Exception:
                return error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
            text = reply_text(model, said)
            if streamed:
                frames = self.stream_frames(admitted, model, prompt, text)
                if request.query_params.get("alt") == "sse":
                    return EventStream(frames, fails=admitted.behaviour == "stream_fail")
                # Without `alt=sse`: the same responses as one JSON array (nothing here needs it streamed).
                chunks = [json.loads(f.decode()[len("data: ") :]) for f in frames if isinstance(f, bytes)]
                return JSONResponse(chunks)
            usage = {"promptTokenCount": tokens(prompt), "candidatesTokenCount": tokens(text)}
            usage["totalTokenCount"] = usage["promptTokenCount"] + usage["candidatesTokenCount"]
            return {
                "candidates": [
                    {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}
                ],
                "usageMetadata": usage,
                "modelVersion": model,
            }

        return router

    def stream_frames(self, rule: Rule, model: str, prompt: str, text: str) -> list[Frame]:
        pieces = stream_pieces(text, rule)
        prompt_tokens = tokens(prompt)
        response_id = uuid.uuid4().hex[:22]

        def chunk(piece: str, last: bool = False) -> bytes:
            candidate: Json = {"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0}
            usage: Json = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
            if last:
                candidate["finishReason"] = "STOP"
                output = tokens("".join(pieces))
                usage = {**usage, "candidatesTokenCount": output, "totalTokenCount": prompt_tokens + output}
            return sse(
                {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": response_id}
            )

        error_event = sse(
            {
                "error": {
                    "code": 503,
                    "message": "The model is overloaded. Please try again later.",
                    "status": "UNAVAILABLE",
                }
            }
        )
        # The last piece travels in the last chunk, with the finish reason and the whole usage.
        frames = stream_script(
            rule, pieces[:-1], head=[], delta=chunk, tail=[chunk(pieces[-1], last=True)], error=error_event
        )
        return frames
