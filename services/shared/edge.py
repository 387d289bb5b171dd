"""The HTTP edge every service shares (contract, DESIGN.md "Bounds of input").

- `BodyLimit`: bodies over the limit get 413 before anything else is done (authentication, parsing),
  counted as they arrive, so a chunked body without a Content-Length is stopped as well.
- `install_outage_handlers`: PostgreSQL or Kafka unreachable is a 503 with a sentence, on every route
  (`outage_answer`: that answer, for a path that is not a route).
- `install_http_error_handler`: the framework's own refusals (an unreadable body, an unknown path) in
  the service's error shape; a body that cannot be parsed is a malformed request, 422 (`refusal`: a
  refusal in that shape, returned rather than raised).
- `describe`: a validation error as a sentence, saying where and what is wrong, never echoing the input.
- `PrintableId`: an id field (control characters and lone surrogates refused), documented portably.
- `error_responses` / `HEALTH_RESPONSES`: what the OpenAPI documents say about those answers.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Annotated, Any

import asyncpg
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, WithJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.events import MODEL_ID_PATTERN, PRINTABLE, Identifier
from services.shared.db import database_away
from services.shared.kafka import kafka_away

DEFAULT_MAX_BODY_BYTES = 64 * 1024

# An id field at the edge: checked exactly as events check ids (`Identifier`, Unicode classes), and
# documented with the part of that rule a Python and ECMA regex can state (the OpenAPI tools read
# `pattern` as one; `\p{Cc}` is neither): no C0/C1 control characters and no line separators.
PrintableId = Annotated[
    Identifier,
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 200,
            "pattern": r"^[^\x00-\x1F\x7F-\x9F\u2028\u2029]+$",
            "description": "Printable text: no control, format, private-use or unassigned characters, no line separators",
        }
    ),
]

ErrorBody = Callable[[str, str], dict[str, Any]]
"""A service's error shape: (machine code, sentence) -> the JSON body."""


def _kib(n: int) -> str:
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} bytes"


# A body over the limit is still read, and thrown away, up to this many bytes (and for at most
# DRAIN_SECONDS) before the 413 is sent: a client that sends its whole body before it reads the
# answer (httpx, most HTTP/1.1 clients) would otherwise find the connection reset under its upload
# and never see the 413. Beyond this bound the 413 is sent at once and the connection closed.
DRAIN_BYTES = 8 * 1024 * 1024
DRAIN_SECONDS = 10.0


def request_headers(scope: Scope, wanted: Collection[bytes]) -> dict[bytes, bytes]:
    """For a short path placed in front of an app: the `wanted` headers (lower-case names) as the app's
    routes read them: the first of each, as Starlette's `Headers.get`, and every Cookie header joined,
    as its `Request.cookies`."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name == b"cookie" and name in found:
            found[name] += b"; " + value
        elif name in wanted and name not in found:
            found[name] = value
    return found


def declares_json_within(headers: Mapping[bytes, bytes], max_bytes: int) -> bool:
    """Whether a request says it sends JSON (`application/json`, any parameters) and a Content-Length of
    at most `max_bytes`: what a short path takes; anything else is left to the app's body limit and
    parser."""
    try:
        size = int(headers.get(b"content-length", b"-1"))
    except ValueError:
        return False
    kind = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    return 0 <= size <= max_bytes and kind == b"application/json"


async def read_body(app: ASGIApp, max_bytes: int, scope: Scope, receive: Receive, send: Send) -> bytes | None:
    """For a short path placed in front of `app`: the request's whole body, or None when there is
    nothing more to do: the client left, or the body passed `max_bytes` (more than it declared), which
    was then handed on to `app`, whose body limit answers."""
    chunks, read, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        read += len(chunk)
        more = message.get("more_body", False)
        if read > max_bytes:
            await app(scope, replay(b"".join(chunks), more, receive), send)
            return None
    return b"".join(chunks)


def replay(body: bytes, more: bool, receive: Receive) -> Receive:
    """A receive that gives `body` (what was read of the request) first, then goes on reading it (after
    a whole body, only a disconnect can come)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replayed


class BodyLimit:
    """ASGI middleware: a request body larger than `max_bytes` is answered 413, never handed on.

    The body is counted as it arrives, so a body sent in chunks without a Content-Length is stopped as
    well; at most `max_bytes` of it are ever held, and the app never starts on a request it cannot
    finish. A too-large body is read and discarded up to `drain_bytes` before the 413 (so every
    client reads the answer on a connection that stays usable); one declared or found larger than
    that is answered at once and its connection closed, as is one whose client asked to wait for
    the server's go-ahead (`Expect: 100-continue`: it sends nothing before it).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body: ErrorBody | None = None,
        drain_bytes: int = DRAIN_BYTES,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.drain_bytes, self.drain_seconds = max(drain_bytes, max_bytes), drain_seconds
        self.body: ErrorBody = body or (lambda code, sentence: {"error": code, "message": sentence})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            if declared > self.drain_bytes or _expects_continue(scope):
                return await self._refuse(send, close=True)
            return await self._drain_then_refuse(receive, send, 0, True)
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                chunks.clear()
                return await self._drain_then_refuse(receive, send, size, more)
            if chunk:
                chunks.append(chunk)
        await self.app(scope, replay(b"".join(chunks), False, receive), send)

    async def _drain_then_refuse(self, receive: Receive, send: Send, size: int, more: bool) -> None:
        """Read and drop the rest of a too-large body (up to drain_bytes, for drain_seconds), then 413."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_seconds
        while more and size <= self.drain_bytes:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        # All of it read: the connection can serve the client's next request. Otherwise it must close.
        await self._refuse(send, close=more)

    async def _refuse(self, send: Send, close: bool = True) -> None:
        sentence = (
            f"The request body is larger than {_kib(self.max_bytes)}, the most this service accepts. "
            "Send a smaller body."
        )
        headers = {"Connection": "close"} if close else None
        response = JSONResponse(self.body("body_too_large", sentence), status_code=413, headers=headers)
        await response({"type": "http"}, _nothing, send)


def _expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope.get("headers", ()))


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# --- outages --------------------------------------------------------------------------------------

# What an outage looks like from the clients, by class: the handlers below are registered for these,
# and each then asks the one classifier of its part (services.shared.db.database_away,
# services.shared.kafka.kafka_away) whether this error is the part being away. One that is not (asyncpg's
# DataError for a bad argument, "another operation is in progress", a file not found, a message Kafka
# refuses as it is) is a bug: re-raised, it stays a 500 with its traceback in the log.
DATABASE_DOWN: tuple[type[Exception], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError and ConnectionError are OSErrors
    asyncpg.PostgresConnectionError,  # class 08, e.g. ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutting down, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: no connection slot left
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing"
    asyncpg.exceptions.InternalClientError,  # "cannot switch to state 12": the connection went away mid-query
)
KAFKA_DOWN: tuple[type[Exception], ...] = (KafkaError,)

log = logging.getLogger(__name__)


def outage_answer(exc: Exception, body: ErrorBody) -> JSONResponse | None:
    """The 503 of a database or Kafka outage, or None: `exc` is neither."""
    if database_away(exc):
        log.debug("answered 503: database away (%s: %s)", type(exc).__name__, exc)
        return JSONResponse(
            body(
                "database_unavailable",
                "The database is not reachable right now, so this request could not be "
                "carried out. Nothing was changed; try again in a minute.",
            ),
            status_code=503,
            headers={"Retry-After": "30"},
        )
    if kafka_away(exc):
        log.debug("answered 503: Kafka away (%s: %s)", type(exc).__name__, exc)
        return JSONResponse(
            body(
                "event_log_unavailable",
                "The event log (Kafka) is not reachable right now, so this request could not "
                "be recorded. Try again in a minute.",
            ),
            status_code=503,
            headers={"Retry-After": "30"},
        )
    return None


def install_outage_handlers(app: FastAPI, body: ErrorBody) -> None:
    """Answer a database or Kafka outage on any route with 503 and a sentence (never a bare 500)."""

    async def outage(_: Request, exc: Exception) -> JSONResponse:
        answer = outage_answer(exc, body)
        if answer is None:
            raise exc
        return answer

    for kind in (*DATABASE_DOWN, *KAFKA_DOWN):
        app.add_exception_handler(kind, outage)


def unreadable_body(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a body, as a sentence (`cause` is what its parser raised)."""
    if isinstance(cause, UnicodeError):
        return "The body could not be read: send JSON text in UTF-8."
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        # Python refuses to convert integers of more than sys.get_int_max_str_digits() digits.
        return (
            f"The body has a number too large to read (more than {sys.get_int_max_str_digits()} digits); "
            "no field here takes a number that large."
        )
    if isinstance(cause, RecursionError):
        return "The body is nested too deeply to read; send a flatter JSON document."
    return "The body could not be read: send one JSON document in UTF-8."


_CODES = {
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    422: "invalid_request",
    503: "unavailable",
}


def refusal(body: ErrorBody, status: int, sentence: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A refusal in the service's error shape, as an HTTPException with this status and sentence gives."""
    return JSONResponse(body(_CODES.get(status, "refused"), sentence), status_code=status, headers=headers)


def install_http_error_handler(app: FastAPI, body: ErrorBody) -> None:
    """HTTPExceptions (the framework's and the routes' own) answered in the service's error shape."""

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):  # registered for that class only: never taken
            raise exc
        if exc.status_code == 400:
            # FastAPI's only 400: a body it could not parse for another reason than its JSON syntax (which
            # FastAPI itself answers 422). Like that one, a malformed request, told by its real cause.
            return JSONResponse(body("invalid_request", unreadable_body(exc.__cause__)), status_code=422)
        sentence = exc.detail if isinstance(exc.detail, str) else "The request was refused."
        return refusal(body, exc.status_code, sentence, exc.headers)

    app.add_exception_handler(StarletteHTTPException, http_error)


# --- validation errors as sentences ---------------------------------------------------------------

_PATTERN_SENTENCES = {
    PRINTABLE: "must be printable text: no control characters, line separators or unassigned characters",
    MODEL_ID_PATTERN: "a model id is 1 to 100 letters, digits, '.', '_', ':' or '-'",
}


def _sentence(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "string_pattern_mismatch":
        pattern = _context(error).get("pattern")
        known = _PATTERN_SENTENCES.get(pattern) if isinstance(pattern, str) else None
        return known or f"must match the pattern {pattern}"
    if kind == "string_unicode":
        return "must be valid Unicode text (a lone surrogate is not)"
    if kind == "json_invalid":  # the parser's reason says where, never what (e.g. a lone surrogate escape)
        reason = _context(error).get("error")
        return f"the body is not valid JSON ({reason})" if reason else "the body is not valid JSON"
    return str(error.get("msg", "is not valid"))


def _context(error: Mapping[str, Any]) -> Mapping[str, Any]:
    """The error's `ctx` (what pydantic says about the rule that failed), empty when it has none."""
    ctx = error.get("ctx")
    return ctx if isinstance(ctx, Mapping) else {}


def describe(errors: Iterable[Mapping[str, Any]], limit: int = 5) -> str:
    """`where: what` for each error (the first `limit`), joined; the input itself is never echoed."""
    parts = []
    for error in list(errors)[:limit]:
        where = "/".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {_sentence(error)}" if where else _sentence(error))
    return "; ".join(parts) or "the request is not valid"


# --- OpenAPI --------------------------------------------------------------------------------------


class ErrorOut(BaseModel):
    """Every refusal: a machine-readable `error` and a `message` a person can act on (services may
    add fields, e.g. the balance a payment needed)."""

    model_config = ConfigDict(extra="allow")
    error: str
    message: str


class DetailOut(BaseModel):
    """The credit service's refusals: `detail` is the sentence."""

    model_config = ConfigDict(extra="allow")
    detail: str


_DESCRIPTIONS = {
    400: "Refused",
    401: "Not signed in, or the token is forged or expired",
    402: "Not enough credits",
    403: "Not allowed for this caller",
    404: "Not found",
    409: "Conflicts with an earlier request",
    413: "Body larger than the limit",
    422: "A field is malformed",
    502: "The provider failed the call",
    503: "A dependency (database, event log, credit service) is unreachable",
}


# A health route answers its own body (what is up, what is not) with 503 when degraded.
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"description": "Degraded: a part is down", "content": {"application/json": {"schema": {"type": "object"}}}},
}


def error_responses(*codes: int, model: type[BaseModel] = ErrorOut) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status in `codes` answered with `model`."""
    return {code: {"model": model, "description": _DESCRIPTIONS.get(code, "Refused")} for code in codes}
