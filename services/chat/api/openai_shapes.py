"""OpenAI's wire shapes for the gateway (`api/routes/gateway.py`): a call's `Outcome` as a
`chat.completion`, as `chat.completion.chunk`s, or as an `{"error": {...}}` whose status the official
SDKs map to their own exception classes; and a middleware that re-shapes the shared edge's refusals
under /v1/ the same way."""

import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from services.chat.call_store import Outcome
from services.chat.refusals import ChatRefused
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
    # One id and the model that runs the call on every chunk, as OpenAI's streams have.
    known = started if isinstance(started, RunningCall) else None
    ident = completion_id({"event_id": known.event_id}) if known and known.event_id else ""
    running_model = (known.model if known else "") or model
    created, head = int(time.time()), {"object": "chat.completion.chunk", "model": running_model}

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
            head["model"] = str(answer.get("model") or head["model"])
            if not item.ok:
                error = json.loads(bytes(failure(item).body))
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


def reshaped(status: int, found: Mapping[str, Any]) -> dict[str, Any]:
    """An error in the service's own shape (`{"error": code, "message": sentence}`) in OpenAI's."""
    detail = {
        "message": str(found.get("message") or found["error"]),
        "type": ERROR_TYPES.get(status, "api_error"),
        "param": None,
        "code": found["error"],
    }
    return {"error": detail}


def in_openai_shape(answer: Response) -> Response:
    """`answer`, an error in the service's own shape (an outage's 503, say), re-shaped as `OpenAIErrors`
    re-shapes it: the same status and headers, OpenAI's body."""
    body = json.dumps(reshaped(answer.status_code, json.loads(bytes(answer.body)))).encode()
    headers = {k: v for k, v in answer.headers.items() if k not in ("content-length", "content-type")}
    return Response(body, status_code=answer.status_code, headers=headers, media_type="application/json")


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
                body = json.dumps(reshaped(start["status"], found)).encode()
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)


def refusal(exc: ChatRefused) -> JSONResponse:
    """A refusal before the call started, in OpenAI's error shape."""
    return openai_error(exc.status, exc.code, exc.message)
