"""The admission hold's short path: `POST /api/holds` placed without FastAPI's request machinery.

Every platform call places a hold, so this one request is most of the credit service's HTTP work; on
FastAPI it spent more CPU in the framework (middleware, routing, dependency solving, response
rendering) than in placing the hold (py-spy, issue 22). `HoldPath` sits in front of the FastAPI app
and takes a JSON request that passes the route's checks: a Content-Length within the body limit, a bearer
token that opens and is not signed out (`deps.caller_of`, as the route's), a body that `HoldIn`
takes. It then answers with the route's own `hold_response` (201, 200, 402, 409, 422 for no price,
503 for a locked account; a database away: the 503 of `outage_answer`, as every route). A request
that fails a check, before anything is held, goes to the FastAPI route with the body read so far,
which refuses it as it always has (401, 413, 422 with its sentence).
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from services.credits.api.deps import ApiContext, caller_of
from services.credits.api.errors import detail_body
from services.credits.api.routes.holds import HoldIn, hold_response
from services.shared.auth import AuthError
from services.shared.edge import declares_json_within, outage_answer, read_body, replay, request_headers

PATH = "/api/holds"
_WANTED = {b"authorization", b"content-length", b"content-type"}


class HoldPath:
    def __init__(self, app: ASGIApp, ctx: ApiContext, max_body_bytes: int) -> None:
        self.app, self.ctx, self.max_body_bytes = app, ctx, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = request_headers(scope, _WANTED)
        authorization = headers.get(b"authorization")
        if authorization is None or not declares_json_within(headers, self.max_body_bytes):
            return await self.app(scope, receive, send)  # the route (and its body limit) answers
        body = await read_body(self.app, self.max_body_bytes, scope, receive, send)
        if body is None:
            return
        checked = self._checked(authorization, body)
        if checked is None:
            return await self.app(scope, replay(body, False, receive), send)
        wanted, user_id = checked
        try:
            answer = await hold_response(self.ctx, wanted, user_id)
        except Exception as exc:
            outage = outage_answer(exc, detail_body)
            if outage is None:
                raise
            answer = outage
        await answer(scope, receive, send)

    def _checked(self, authorization: bytes, body: bytes) -> tuple[HoldIn, str] | None:
        """The hold asked for and the caller's user id, or None: the FastAPI route refuses the request."""
        try:
            who = caller_of(self.ctx, authorization.decode("latin-1"))
            wanted = HoldIn.model_validate_json(body)
        except (AuthError, ValidationError, ValueError):
            return None
        return wanted, who.user_id
