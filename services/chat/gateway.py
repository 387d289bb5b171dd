"""The OpenAI-compatible gateway (DESIGN "An OpenAI-compatible gateway"): `POST /v1/chat/completions`
and `GET /v1/models`, so the product's backend and any OpenAI client (the `openai` SDK, LiteLLM, ...)
reach every model of the catalog with BYOK and billing applied.

The route only translates: OpenAI's request into a `CallRequest` for the same call use case as the
page's `POST /chat` (idempotency, holds, endings, streaming), and its `Outcome` back into OpenAI's
shapes (a `chat.completion`, `chat.completion.chunk`s, or an `{"error": {...}}`), with `billing` on the
answer and on the last chunk. Anthropic and Gemini models are translated by `providers/` as for any
call. `X-Provider-Key` is the user's own key for this call only: never stored, logged or echoed.
"""

import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from billing.pricing import default_price_book
from schemas.events import Feature, utc_now
from services.chat.call_request import CallRequest
from services.chat.call_store import Outcome
from services.chat.catalog import MODELS
from services.chat.identity import Identity
from services.chat.refusals import ChatRefused, InvalidRequest
from services.chat.running import RunningCall
from services.shared.edge import error_responses

# OpenAI's error `type` for each status this route answers (its SDK raises a class per status).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_credits",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
}
# A retry of the same request gets the same answer (one Idempotency-Key, one call): the SDKs' own
# retries would only repeat it.
NO_RETRY = {"x-should-retry": "false"}


def openai_error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": None, "code": code}}
    body["error"].update(extra)
    return JSONResponse(body, status_code=status, headers=NO_RETRY)


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorOut(BaseModel):
    """OpenAI's error shape, which its SDKs turn into their own exception classes."""

    error: OpenAIErrorDetail


GATEWAY_ERRORS = error_responses(401, 402, 403, 404, 409, 413, 422, 429, 502, 503, model=OpenAIErrorOut)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionIn(BaseModel):
    """OpenAI's chat completion request; parameters this gateway does not apply are accepted and
    ignored (temperature, top_p, user, ...), except those that would change the answer's shape."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")
    messages: list[MessageIn] = Field(min_length=1, max_length=1000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=200_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=200_000)
    n: int | None = Field(default=None, ge=1, le=1)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("tools are not supported by this gateway")
        return tools


def completion_id(answer: Mapping[str, Any]) -> str:
    return "chatcmpl-" + str(answer.get("event_id", "")).replace("-", "")


def usage_of(answer: Mapping[str, Any]) -> dict[str, int]:
    used = answer.get("usage") or {}
    prompt, completion = int(used.get("input_tokens", 0)), int(used.get("output_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def billing_of(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The call's billing as OpenAI clients see it: key source, credits charged, balance after."""
    billed = answer.get("billing") or {}
    return {
        "key_source": billed.get("key_source", answer.get("key_source")),
        "charged": bool(billed.get("charged", False)),
        "credits": int(billed.get("credits", 0)),
        "balance_after": billed.get("balance_after"),
        "price_list_version": billed.get("price_list_version"),
        "ending": answer.get("ending"),
        "notice": answer.get("notice"),
    }


def completion(answer: Mapping[str, Any], model: str) -> dict[str, Any]:
    return {
        "id": completion_id(answer),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.get("model", model),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.get("reply") or "", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": usage_of(answer),
        "system_fingerprint": None,
        "billing": billing_of(answer),
    }


# The user's own key refused by its provider: the SDK's class for it, not a server error (502 stays for
# a provider that failed on the platform's key, or failed whatever the key).
OWN_KEY_STATUS = {
    "invalid": 403,
    "revoked_or_expired": 403,
    "permission_denied": 403,
    "rate_limited": 429,
    "quota_exhausted": 429,
}


def failure(outcome: Outcome) -> JSONResponse:
    body, status = outcome.body, outcome.status
    if status == 502 and body.get("key_source") == "byok":
        status = OWN_KEY_STATUS.get(str(body.get("key_status")), status)
    extra = {"billing": billing_of(body)} if "billing" in body or "charged" in body else {}
    code = "provider_key_refused" if status != outcome.status else str(body.get("error", "error"))
    return openai_error(status, code, str(body.get("message", "")), **extra)


def sse(data: object) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def chunks(started: RunningCall | Outcome, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """The call as OpenAI's stream: a role chunk, content chunks, a finish chunk with `billing`, the
    usage chunk when asked, `[DONE]`; a failure as `{"error": ...}` (the SDKs raise on it)."""
    created, head = int(time.time()), {"object": "chat.completion.chunk", "model": model}
    ident = ""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse(
            {
                "id": ident,
                **head,
                "created": created,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
        )

    items: AsyncIterator[str | Outcome | None]
    if isinstance(started, Outcome):

        async def once() -> AsyncIterator[str | Outcome | None]:
            yield started

        items = once()
    else:
        items = started.follow()
    opened = False
    async for item in items:
        if item is None:
            yield b": keep-alive\n\n"
            continue
        if isinstance(item, Outcome):
            answer = item.body
            ident = completion_id(answer)
            if not item.ok:
                error = json.loads(failure(item).body)
                yield sse(error)
                return
            if not opened:  # a finished call replayed: its text in one piece
                yield chunk({"role": "assistant", "content": answer.get("reply") or ""})
            yield sse(
                {
                    "id": ident,
                    **head,
                    "created": created,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}],
                    "billing": billing_of(answer),
                }
            )
            if include_usage:
                yield sse({"id": ident, **head, "created": created, "choices": [], "usage": usage_of(answer)})
            yield b"data: [DONE]\n\n"
            return
        yield chunk({"role": "assistant", "content": item} if not opened else {"content": item})
        opened = True


class OpenAIErrors:
    """ASGI middleware: under /v1/, an error the app's shared edge answered in the service's own shape
    (`{"error": code, "message": sentence}`: an oversized or unreadable body, an outage) is re-shaped
    into OpenAI's, so the SDKs raise their own classes for every refusal."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def reshape(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # hold it until the body says which shape it is
                return
            if start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body, headers = b"".join(chunks), list(start["headers"])
            try:
                found = json.loads(body)
            except ValueError:
                found = None
            if isinstance(found, dict) and isinstance(found.get("error"), str):
                status = start["status"]
                detail = {
                    "message": str(found.get("message") or found["error"]),
                    "type": ERROR_TYPES.get(status, "api_error"),
                    "param": None,
                    "code": found["error"],
                }
                body = json.dumps({"error": detail}).encode()
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)


def create_router(principal: Any, wiring: Any, session_keys: Any) -> APIRouter:
    """The gateway's routes, with the app's own dependencies (identity, wiring, the session's keys)."""
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

    @router.get("/models", responses=error_responses(401, model=OpenAIErrorOut))
    async def models(who: Annotated[Identity, Depends(principal)]) -> dict[str, Any]:
        """Every model of the catalog, whatever its provider; `credits` is its platform price (null: it
        runs only on the user's own key)."""
        prices = default_price_book().in_force(utc_now())
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": p.value, "credits": prices.model_price(m)}
                for p, ms in MODELS.items()
                for m in ms
            ],
        }

    @router.post(
        "/chat/completions",
        responses={
            200: {
                "description": "A chat.completion; with `stream: true`, chat.completion.chunk events, then [DONE]",
                "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
            },
            **GATEWAY_ERRORS,
        },
    )
    async def chat_completions(
        body: CompletionIn,
        request: Request,
        who: Annotated[Identity, Depends(principal)],
        w: Annotated[Any, Depends(wiring)],
        ring: Annotated[Any, Depends(session_keys)],
        x_feature: Annotated[str | None, Header()] = None,
        x_provider_key: Annotated[str | None, Header(max_length=1024)] = None,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> Any:
        try:
            feature = Feature(x_feature or Feature.CHAT.value)
        except ValueError:
            raise InvalidRequest(
                f"X-Feature is one of {', '.join(f.value for f in Feature)}.", reason="invalid_feature"
            ) from None
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise InvalidRequest("messages: send at least one user message with text.", reason="empty_messages")
        call = CallRequest(
            feature,
            messages,
            model=body.model,
            own_key=x_provider_key or None,
            max_tokens=body.max_completion_tokens or body.max_tokens or 1024,
            route="v1",
        )
        started = await w.calls.start(who, ring, call, idempotency_key=idempotency_key, stream=body.stream)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                chunks(started, body.model, include),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        outcome = started if isinstance(started, Outcome) else await started.result()
        if not outcome.ok:
            return failure(outcome)
        return JSONResponse(completion(outcome.body, body.model))

    return router


def refusal(exc: ChatRefused) -> JSONResponse:
    """A refusal before the call started, in OpenAI's error shape."""
    return openai_error(exc.status, exc.code, exc.message)
