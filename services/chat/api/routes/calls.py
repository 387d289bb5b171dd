"""`POST /chat`: one user action's call, plain JSON or Server-Sent Events, and `GET /api/calls/{key}`:
where a call stands after a dropped connection. The call itself is `services/chat/calls.py`'s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.events import Feature, KeySource
from services.chat.api.deps import Who, Wired, identify
from services.chat.api.errors import error_body
from services.chat.call_store import Outcome
from services.chat.key_session import KEY_COOKIE
from services.chat.routing import page_request
from services.chat.running import RunningCall
from services.chat.wiring import Wiring
from services.shared.edge import error_responses

router = APIRouter()
CALLS = Counter(
    "chat_calls_total", "Model call answers by feature, key source and ending", ["feature", "key_source", "ending"]
)
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


class Shown(BaseModel):
    """What the page showed for the call (its feature's line): the call runs on it or is refused (409)."""

    model_config = ConfigDict(extra="forbid")
    key_source: KeySource
    model: str = Field(min_length=1, max_length=100)
    credits: int | None = Field(ge=0, le=1_000_000)


class ChatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    feature: Feature = Feature.CHAT
    # Its bound (MAX_MESSAGE_CHARS) is checked by the call itself, with a sentence that says the count.
    message: str = Field(min_length=1)
    # Server-Sent Events: `delta` events with the text as it comes, then one `done` or `error`.
    stream: bool = False
    # Optional: without it the call runs on whatever the settings say when it arrives (API clients).
    shown: Shown | None = None


def count(outcome: Outcome) -> None:
    body = outcome.body
    CALLS.labels(body.get("feature", ""), body.get("key_source", ""), body.get("ending", "")).inc()


def sse_event(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def sse(started: RunningCall | Outcome) -> AsyncIterator[bytes]:
    """A call as Server-Sent Events: `delta` events with the text as it comes, then exactly one `done`
    (the JSON answer's body) or `error` (a sentence, `charged: false`). Leaving the stream stops the call
    (DESIGN "The call lifecycle": after the first token it is charged)."""
    if isinstance(started, Outcome):
        yield sse_event("done" if started.ok else "error", started.body)
        return
    async for item in started.follow():
        if item is None:
            yield b": keep-alive\n\n"
        elif isinstance(item, Outcome):
            count(item)
            yield sse_event("done" if item.ok else "error", item.body)
        else:
            yield sse_event("delta", {"text": item})


def is_json(content_type: str | None) -> bool:
    """FastAPI's rule for a JSON body: no Content-Type, application/json or application/*+json."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


CHAT_BODY = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatIn"}}}, "required": True}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "One per user action: a retry with the same key within 24 h is the same call",
    "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[\\x21-\\x7e]+$"},
}


# The hot route reads its inputs itself rather than through dependencies: FastAPI's dependency solving
# and response encoding cost more than the rest of the route. Same order as the others (who is calling,
# then the body), same refusals (401, then 422 through the app's `invalid`).
@router.post(
    "/chat",
    openapi_extra={"requestBody": CHAT_BODY, "parameters": [IDEMPOTENCY_KEY]},
    responses={
        200: {
            "description": "The answer and its billing; with `stream: true`, Server-Sent Events "
            "(`delta` events, then one `done` or `error`)",
            "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
        },
        **error_responses(401, 402, 409, 413, 422, 502, 503),
    },
)
async def chat(request: Request) -> Response:
    who = identify(request)
    w: Wiring = request.app.state.wiring
    ring = w.key_cookie.open(who.user_id, who.session_id, request.cookies.get(KEY_COOKIE))
    if not is_json(request.headers.get("content-type")):
        # As FastAPI does for the other routes: a cross-site form can post text/plain, never JSON.
        raise RequestValidationError(
            [
                {
                    "type": "content_type",
                    "loc": ("body",),
                    "input": None,
                    "msg": "send the body as JSON (Content-Type: application/json)",
                }
            ]
        )
    try:
        body = ChatIn.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    started = await w.calls.start(
        who,
        ring,
        page_request(
            body.feature,
            body.message,
            None if body.shown is None else (body.shown.key_source.value, body.shown.model, body.shown.credits),
        ),
        idempotency_key=request.headers.get("idempotency-key"),
        stream=body.stream,
    )
    if body.stream:
        return StreamingResponse(sse(started), media_type="text/event-stream", headers=SSE_HEADERS)
    outcome = started if isinstance(started, Outcome) else await started.result()
    count(outcome)
    return JSONResponse(outcome.body, status_code=outcome.status)


@router.get("/api/calls/{idempotency_key}", responses=error_responses(401, 404, 422))
async def call_outcome(idempotency_key: str, who: Who, w: Wired) -> JSONResponse:
    """Where the user's call with this Idempotency-Key stands (after a dropped connection): `running`, or
    `ended` with the answer it had (`status`, `answer`). Never starts a call."""
    state, outcome = await w.calls.find(who, idempotency_key)
    if state == "unknown":
        return JSONResponse(
            error_body("not_found", "No call with this key reached the server: it was not charged. Send it again."),
            status_code=404,
        )
    found: dict[str, Any] = {"state": state, "idempotency_key": idempotency_key}
    if outcome is not None:
        found.update(status=outcome.status, answer=outcome.body)
    return JSONResponse(found)
