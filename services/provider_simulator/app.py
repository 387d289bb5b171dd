"""The simulator's ASGI app and its state (see the package docstring for the control API)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.provider_simulator.urls import base_urls  # noqa: F401  (re-exported)

PROVIDERS = ("openai", "groq", "anthropic", "gemini")
BEHAVIOURS = ("valid", "invalid", "revoked", "no_quota", "denied", "rate_limited", "slow", "down")
# Marker words recognised in unregistered keys, first match wins ("invalid" before "valid").
_MARKERS = (
    ("revoked", "revoked"),
    ("noquota", "no_quota"),
    ("denied", "denied"),
    ("ratelimited", "rate_limited"),
    ("slow", "slow"),
    ("down", "down"),
    ("invalid", "invalid"),
    ("valid", "valid"),
)
DEFAULT_SLOW_MS = 5000

MODELS = {
    "openai": ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o3-mini", "gpt-5.2-pro"],
    "groq": [
        "llama-3.3-70b-versatile",
        "llama3-8b-8192",
        "gemma2-9b-it",
        "qwen-qwq-32b",
        "deepseek-r1-distill-llama-70b",
    ],
    "anthropic": ["claude-sonnet-4", "claude-3-7-sonnet", "claude-3-5-sonnet", "claude-3-5-haiku", "claude-opus-4"],
    "gemini": ["gemini-2.5-pro", "gemini-2.5-flash"],
}


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class Rule:
    behaviour: str
    delay_ms: int = 0
    status: int | None = None
    providers: frozenset[str] | None = None


@dataclass
class SimulatorState:
    """Key rules and call counts. Thread-safe: tests read it while the server thread serves."""

    default_behaviour: str = "invalid"
    _rules: dict[str, Rule] = field(default_factory=dict)  # by key fingerprint
    _outages: dict[str, int] = field(default_factory=dict)
    _calls: Counter = field(default_factory=Counter)  # (fingerprint, provider) -> n
    _endpoints: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(
        self,
        key: str,
        behaviour: str,
        *,
        delay_ms: int = 0,
        status: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; one of {BEHAVIOURS}")
        with self._lock:
            self._rules[_fingerprint(key)] = Rule(
                behaviour, delay_ms, status, frozenset(providers) if providers else None
            )

    def set_outage(self, provider: str, status: int = 503) -> None:
        with self._lock:
            self._outages[provider] = status

    def clear_outages(self) -> None:
        with self._lock:
            self._outages.clear()

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self._outages.clear()
            self._calls.clear()
            self._endpoints.clear()
            self.default_behaviour = "invalid"

    def calls(self, key: str, provider: str | None = None) -> int:
        """How many provider calls were made with `key` (on `provider`, or on any)."""
        fp = _fingerprint(key)
        with self._lock:
            return sum(n for (f, p), n in self._calls.items() if f == fp and provider in (None, p))

    def calls_by_provider(self, key: str | None = None) -> dict[str, int]:
        fp = _fingerprint(key) if key is not None else None
        out: Counter = Counter()
        with self._lock:
            for (f, p), n in self._calls.items():
                if fp in (None, f):
                    out[p] += n
        return dict(out)

    def total_calls(self) -> int:
        with self._lock:
            return sum(self._calls.values())

    def endpoints(self) -> dict[str, int]:
        with self._lock:
            return dict(self._endpoints)

    def _count(self, key: str | None, provider: str, endpoint: str) -> None:
        with self._lock:
            self._calls[(_fingerprint(key or ""), provider)] += 1
            self._endpoints[f"{provider} {endpoint}"] += 1

    def decide(self, key: str, provider: str) -> tuple[Rule, int | None]:
        """The rule for `key` on `provider`, and the provider's outage status if any."""
        with self._lock:
            outage = self._outages.get(provider)
            rule = self._rules.get(_fingerprint(key))
            default = self.default_behaviour
        if rule is not None:
            if rule.providers is not None and provider not in rule.providers:
                return Rule("invalid"), outage
            return rule, outage
        lowered = key.lower()
        for marker, behaviour in _MARKERS:
            if marker in lowered:
                return Rule(behaviour, DEFAULT_SLOW_MS if behaviour == "slow" else 0), outage
        return Rule(default), outage


# --- provider error bodies --------------------------------------------------------------------


def _openai_error(status: int, message: str, type_: str, code: str | None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status, headers=headers
    )


def _openai_refusal(provider: str, rule: Rule) -> JSONResponse | None:
    name = "OpenAI" if provider == "openai" else "Groq"
    b = rule.behaviour
    if b == "invalid":
        message = (
            (
                "Incorrect API key provided: sk-...****. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
            if provider == "openai"
            else "Invalid API Key"
        )
        return _openai_error(401, message, "invalid_request_error", "invalid_api_key")
    if b == "revoked":
        return _openai_error(
            401,
            "This key is associated with a deactivated account. If you feel this is an error, "
            "contact us through our help center.",
            "invalid_request_error",
            "account_deactivated",
        )
    if b == "denied":
        return _openai_error(
            403,
            f"You are not allowed to use this {name} API with this key: the project or "
            "organization does not have permission.",
            "invalid_request_error",
            "unsupported_country_region_territory" if provider == "openai" else "permission_denied",
        )
    if b == "no_quota":
        return _openai_error(
            429,
            "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "insufficient_quota",
            "insufficient_quota",
        )
    if b == "rate_limited":
        return _openai_error(
            429,
            "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
            "requests",
            "rate_limit_exceeded",
            headers={"retry-after": "20", "x-ratelimit-remaining-requests": "0"},
        )
    if b == "down":
        status = rule.status or 503
        return _openai_error(
            status,
            "The server is overloaded or not ready yet."
            if status == 503
            else "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        )
    return None


def _anthropic_error(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"type": "error", "error": {"type": type_, "message": message}, "request_id": f"req_{uuid.uuid4().hex[:24]}"},
        status_code=status,
        headers=headers,
    )


def _anthropic_refusal(rule: Rule) -> JSONResponse | None:
    b = rule.behaviour
    if b == "invalid":
        return _anthropic_error(401, "authentication_error", "invalid x-api-key")
    if b == "revoked":
        return _anthropic_error(401, "authentication_error", "This API key has been disabled.")
    if b == "denied":
        return _anthropic_error(
            403, "permission_error", "Your API key does not have permission to use the specified resource."
        )
    if b == "no_quota":
        return _anthropic_error(
            400,
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic "
            "API. Please go to Plans & Billing to upgrade or purchase credits.",
        )
    if b == "rate_limited":
        return _anthropic_error(
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit.",
            headers={"retry-after": "15"},
        )
    if b == "down":
        status = rule.status or 529
        return _anthropic_error(
            status,
            "overloaded_error" if status == 529 else "api_error",
            "Overloaded" if status == 529 else "Internal server error",
        )
    return None


def _gemini_error(status: int, grpc_status: str, message: str, details: list | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": status, "message": message, "status": grpc_status, "details": details or []}},
        status_code=status,
    )


def _error_info(reason: str) -> dict:
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }


def _quota_failure(quota_id: str, retry_s: int | None) -> list[dict]:
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


def _gemini_refusal(rule: Rule) -> JSONResponse | None:
    b = rule.behaviour
    if b == "invalid":
        return _gemini_error(
            400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [_error_info("API_KEY_INVALID")]
        )
    if b == "revoked":
        return _gemini_error(
            400, "INVALID_ARGUMENT", "API key expired. Please renew the API key.", [_error_info("API_KEY_EXPIRED")]
        )
    if b == "denied":
        return _gemini_error(
            403, "PERMISSION_DENIED", "The caller does not have permission", [_error_info("API_KEY_SERVICE_BLOCKED")]
        )
    quota_message = (
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
    )
    if b == "no_quota":
        return _gemini_error(
            429,
            "RESOURCE_EXHAUSTED",
            quota_message,
            _quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier", None),
        )
    if b == "rate_limited":
        return _gemini_error(
            429,
            "RESOURCE_EXHAUSTED",
            quota_message,
            _quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", 30),
        )
    if b == "down":
        status = rule.status or 503
        return _gemini_error(
            status,
            "UNAVAILABLE" if status == 503 else "INTERNAL",
            "The model is overloaded. Please try again later."
            if status == 503
            else "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
        )
    return None


def _refusal(provider: str, rule: Rule) -> JSONResponse | None:
    if provider in ("openai", "groq"):
        return _openai_refusal(provider, rule)
    if provider == "anthropic":
        return _anthropic_refusal(rule)
    return _gemini_refusal(rule)


# --- chat answers -----------------------------------------------------------------------------


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _reply_text(model: str, prompt: str) -> str:
    words = prompt.split()
    gist = " ".join(words[:8]) + ("…" if len(words) > 8 else "")
    return f"[{model} simulated] You said: {gist}"


class KeyRule(BaseModel):
    key: str | None = Field(default=None, min_length=1)
    keys: list[str] = Field(default_factory=list)
    behaviour: str
    delay_ms: int = Field(default=0, ge=0, le=600_000)
    status: int | None = Field(default=None, ge=400, le=599)
    providers: list[str] | None = None


class Outage(BaseModel):
    provider: str
    status: int = Field(default=503, ge=500, le=599)


class DefaultBehaviour(BaseModel):
    behaviour: str


class CallsQuery(BaseModel):
    key: str


def build_app(state: SimulatorState | None = None) -> FastAPI:
    """The simulator as an ASGI app; `app.state.sim` is its `SimulatorState`."""
    state = state or SimulatorState()
    app = FastAPI(title="LLM provider simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sim = state

    def bad_control(message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=400)

    # --- control ---

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.post("/_sim/keys")
    async def register(rule: KeyRule):
        keys = ([rule.key] if rule.key else []) + rule.keys
        if not keys:
            return bad_control("give 'key' or 'keys'")
        if rule.behaviour not in BEHAVIOURS:
            return bad_control(f"unknown behaviour {rule.behaviour!r}; one of {list(BEHAVIOURS)}")
        if rule.providers and set(rule.providers) - set(PROVIDERS):
            return bad_control(f"unknown provider in {rule.providers}; one of {list(PROVIDERS)}")
        delay = rule.delay_ms or (DEFAULT_SLOW_MS if rule.behaviour == "slow" else 0)
        for key in keys:
            state.register(key, rule.behaviour, delay_ms=delay, status=rule.status, providers=rule.providers)
        return {"registered": len(keys)}

    @app.delete("/_sim/keys")
    async def forget():
        with state._lock:
            state._rules.clear()
        return {"ok": True}

    @app.post("/_sim/default")
    async def set_default(body: DefaultBehaviour):
        if body.behaviour not in BEHAVIOURS:
            return bad_control(f"unknown behaviour {body.behaviour!r}; one of {list(BEHAVIOURS)}")
        state.default_behaviour = body.behaviour
        return {"ok": True}

    @app.post("/_sim/outage")
    async def outage(body: Outage):
        if body.provider not in PROVIDERS:
            return bad_control(f"unknown provider {body.provider!r}; one of {list(PROVIDERS)}")
        state.set_outage(body.provider, body.status)
        return {"ok": True}

    @app.delete("/_sim/outage")
    async def end_outage():
        state.clear_outages()
        return {"ok": True}

    @app.post("/_sim/calls")
    async def calls_of_key(body: CallsQuery):
        return {"calls": state.calls(body.key), "by_provider": state.calls_by_provider(body.key)}

    @app.get("/_sim/calls")
    async def all_calls():
        return {
            "total": state.total_calls(),
            "by_provider": state.calls_by_provider(),
            "by_endpoint": state.endpoints(),
        }

    @app.post("/_sim/reset")
    async def reset():
        state.reset()
        return {"ok": True}

    # --- shared gate: count the call, then refuse it or let it through ---

    async def gate(provider: str, key: str | None, endpoint: str) -> JSONResponse | None:
        state._count(key, provider, endpoint)
        if not key:
            return None  # callers answer their provider's "no key" error
        rule, outage_status = state.decide(key, provider)
        if outage_status:
            return _refusal(provider, Rule("down", status=outage_status))
        if rule.delay_ms:
            await asyncio.sleep(rule.delay_ms / 1000)
        return _refusal(provider, rule)

    # --- OpenAI and Groq ---

    def bearer(request: Request) -> str | None:
        value = request.headers.get("authorization", "")
        return value[7:].strip() or None if value.lower().startswith("bearer ") else None

    def openai_no_key() -> JSONResponse:
        return _openai_error(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
            None,
        )

    async def openai_models(provider: str, request: Request):
        key = bearer(request)
        if (refused := await gate(provider, key, "models")) is not None:
            return refused
        if not key:
            return openai_no_key()
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": provider} for m in MODELS[provider]
            ],
        }

    async def openai_chat(provider: str, request: Request):
        key = bearer(request)
        if (refused := await gate(provider, key, "chat")) is not None:
            return refused
        if not key:
            return openai_no_key()
        try:
            body = await request.json()
            model, messages = body["model"], body["messages"]
            prompt = " ".join(str(m.get("content", "")) for m in messages)
        except Exception:
            return _openai_error(
                400, "We could not parse the JSON body of your request.", "invalid_request_error", None
            )
        text = _reply_text(model, prompt)
        usage = {"prompt_tokens": _tokens(prompt), "completion_tokens": _tokens(text)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }

    @app.get("/openai/v1/models")
    async def openai_models_route(request: Request):
        return await openai_models("openai", request)

    @app.post("/openai/v1/chat/completions")
    async def openai_chat_route(request: Request):
        return await openai_chat("openai", request)

    @app.get("/groq/openai/v1/models")
    async def groq_models_route(request: Request):
        return await openai_models("groq", request)

    @app.post("/groq/openai/v1/chat/completions")
    async def groq_chat_route(request: Request):
        return await openai_chat("groq", request)

    # --- Anthropic ---

    def anthropic_precheck(request: Request) -> JSONResponse | None:
        if not request.headers.get("x-api-key"):
            return _anthropic_error(401, "authentication_error", "x-api-key header is required")
        if not request.headers.get("anthropic-version"):
            return _anthropic_error(400, "invalid_request_error", "anthropic-version: header is required")
        return None

    @app.get("/anthropic/v1/models")
    async def anthropic_models(request: Request):
        key = request.headers.get("x-api-key")
        if (refused := await gate("anthropic", key, "models")) is not None:
            return refused
        if (refused := anthropic_precheck(request)) is not None:
            return refused
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": m.replace("-", " ").title(),
                "created_at": "2025-05-22T00:00:00Z",
            }
            for m in MODELS["anthropic"]
        ]
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}

    @app.post("/anthropic/v1/messages")
    async def anthropic_messages(request: Request):
        key = request.headers.get("x-api-key")
        if (refused := await gate("anthropic", key, "chat")) is not None:
            return refused
        if (refused := anthropic_precheck(request)) is not None:
            return refused
        try:
            body = await request.json()
            model, messages, max_tokens = body["model"], body["messages"], int(body["max_tokens"])
            prompt = " ".join(str(m.get("content", "")) for m in messages) + " " + str(body.get("system", ""))
        except Exception:
            return _anthropic_error(400, "invalid_request_error", "model, messages and max_tokens are required")
        text = _reply_text(model, prompt)
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": _tokens(prompt), "output_tokens": min(max_tokens, _tokens(text))},
        }

    # --- Gemini ---

    def gemini_key(request: Request) -> str | None:
        return request.headers.get("x-goog-api-key") or request.query_params.get("key")

    def gemini_no_key() -> JSONResponse:
        return _gemini_error(
            403,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without "
            "established identity). Please use API Key or other form of "
            "API consumer identity to call this API.",
        )

    @app.get("/gemini/v1beta/models")
    async def gemini_models(request: Request):
        key = gemini_key(request)
        if (refused := await gate("gemini", key, "models")) is not None:
            return refused
        if not key:
            return gemini_no_key()
        return {
            "models": [
                {
                    "name": f"models/{m}",
                    "version": "001",
                    "displayName": m,
                    "supportedGenerationMethods": ["generateContent", "countTokens"],
                }
                for m in MODELS["gemini"]
            ]
        }

    @app.post("/gemini/v1beta/models/{model_action}")
    async def gemini_generate(model_action: str, request: Request):
        model, _, action = model_action.partition(":")
        if action != "generateContent":
            return _gemini_error(404, "NOT_FOUND", f"Method {action or '(none)'} not found")
        key = gemini_key(request)
        if (refused := await gate("gemini", key, "chat")) is not None:
            return refused
        if not key:
            return gemini_no_key()
        try:
            body = await request.json()
            prompt = " ".join(p.get("text", "") for c in body["contents"] for p in c.get("parts", []))
        except Exception:
            return _gemini_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        text = _reply_text(model, prompt)
        usage = {"promptTokenCount": _tokens(prompt), "candidatesTokenCount": _tokens(text)}
        usage["totalTokenCount"] = usage["promptTokenCount"] + usage["candidatesTokenCount"]
        return {
            "candidates": [
                {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": usage,
            "modelVersion": model,
        }

    return app
