"""The gateway's short path: `POST /v1/chat/completions` answered without FastAPI's request machinery.

The gateway is the chat's busiest route (every call of the product's backend), and on FastAPI a call
spent about as much CPU in the framework (middleware, routing, dependency solving, response rendering)
as in the call's own work (py-spy, issue 22), as the credit service's holds did (`hold_path.py` there).
`GatewayPath` sits in front of the FastAPI app and takes a JSON request that passes the route's
checks: a Content-Length within the body limit, a caller the route's `principal` accepts (bearer token,
else session cookie), a body `CompletionIn` takes, headers the route takes and a call
`gateway_call` makes of them. It then answers with the route's own `completion_response`; a refusal of
`ChatCalls.start` and an outage are answered as the app's handlers answer them under /v1/. A request
that fails a check, before anything is claimed or held, goes to the FastAPI route with the body read so
far, which refuses it as it always has (401, 413, 422 with its sentence, in OpenAI's shape).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import cookie_parser
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from services.chat.api import errors
from services.chat.api.openai_shapes import in_openai_shape
from services.chat.api.routes.gateway import (
    MAX_PROVIDER_KEY_CHARS,
    CompletionIn,
    completion_response,
    gateway_call,
)
from services.chat.call_request import CallRequest
from services.chat.identity import SESSION_COOKIE, AuthError, Identity, TokenReader, token_from
from services.chat.key_session import KEY_COOKIE
from services.chat.refusals import ChatRefused, InvalidRequest
from services.chat.wiring import Wiring
from services.shared.edge import declares_json_within, outage_answer, read_body, replay, request_headers

PATH = "/v1/chat/completions"
_WANTED = {
    b"authorization",
    b"cookie",
    b"content-length",
    b"content-type",
    b"x-feature",
    b"x-provider-key",
    b"idempotency-key",
}


class GatewayPath:
    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app: ASGIApp = app
        self.state = app.state  # the FastAPI app's: its token reader, and its wiring once started
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = request_headers(scope, _WANTED)
        wiring: Wiring | None = getattr(self.state, "wiring", None)
        if wiring is None or not declares_json_within(headers, self.max_body_bytes):
            return await self.app(scope, receive, send)  # the route (and its body limit) answers
        body = await read_body(self.app, self.max_body_bytes, scope, receive, send)
        if body is None:
            return
        checked = self._checked(wiring, headers, body)
        if checked is None:
            return await self.app(scope, replay(body, False, receive), send)
        who, ring, wanted, call = checked
        idempotency_key = _text(headers.get(b"idempotency-key"))
        answer: Response
        try:
            answer = await completion_response(wiring, who, ring, wanted, call, idempotency_key)
        except ChatRefused as exc:
            answer = errors.gateway_refusal(exc)
        except AuthError as exc:  # a session signed out meanwhile, say: as the app's handler answers it
            answer = errors.gateway_unauthenticated(exc)
        except Exception as exc:
            outage = outage_answer(exc, errors.error_body)
            if outage is None:
                raise
            answer = in_openai_shape(outage)
        await answer(scope, receive, send)

    def _checked(
        self, wiring: Wiring, headers: dict[bytes, bytes], body: bytes
    ) -> tuple[Identity, Any, CompletionIn, CallRequest] | None:
        """The caller, their session's keys, the request and its call, or None: the route refuses it."""
        own_key = _text(headers.get(b"x-provider-key"))
        if own_key is not None and len(own_key) > MAX_PROVIDER_KEY_CHARS:
            return None
        cookies = cookie_parser(_text(headers.get(b"cookie")) or "")
        tokens: TokenReader = self.state.tokens
        try:
            who = tokens.read(token_from(_text(headers.get(b"authorization")), cookies.get(SESSION_COOKIE)))
            wanted = CompletionIn.model_validate_json(body)
            call = gateway_call(wanted, _text(headers.get(b"x-feature")), own_key)
        except (AuthError, InvalidRequest, ValueError):  # ValueError: pydantic's ValidationError too
            return None
        ring = wiring.key_cookie.open(who.user_id, who.session_id, cookies.get(KEY_COOKIE))
        return who, ring, wanted, call


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None
