"""HTTP entry points of the chat service (port 8000). Routes only translate: read the caller's
identity and session key, call `ChatService`, turn its refusals into HTTP statuses.

Routes: `GET /` (the page), `POST /settings/model`, `GET /api/model-settings`, `DELETE /api/keys/{provider}`,
`POST /chat`, `GET /api/calls/{idempotency_key}`, `GET /api/balance`, `GET /api/usage`, `GET /api/me`, `POST /auth/dev-login` (only with DEV_LOGIN
on), `POST /auth/logout`, `GET /healthz`, `GET /metrics`.
"""

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Cookie, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import providers
from billing.pricing import default_price_book
from schemas.events import Feature, ModelId, Provider, utc_now
from services.chat import gateway
from services.chat.balances import BalanceReader, CreditsUnavailable
from services.chat.call_store import Outcome
from services.chat.calls import ChatCalls, RunningCall
from services.chat.catalog import catalog
from services.chat.identity import SESSION_COOKIE, AuthError, Identity, TokenReader, mint_token, token_from
from services.chat.key_session import KEY_COOKIE, KeyRing, KeySealer
from services.chat.refusals import ChatRefused
from services.chat.routing import page_request
from services.chat.service import ChatService
from services.chat.settings import ChatSettings
from services.chat.usage import UsageReader, UsageUnavailable
from services.shared.edge import (
    HEALTH_RESPONSES,
    BodyLimit,
    describe,
    error_responses,
    install_http_error_handler,
    install_outage_handlers,
)
from services.shared.sessions import SessionRevocations

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"

CALLS = Counter(
    "chat_calls_total", "Model call answers by feature, key source and ending", ["feature", "key_source", "ending"]
)
REFUSALS = Counter("chat_refusals_total", "Calls refused before reaching a provider", ["reason"])


@dataclass
class Wiring:
    """What the routes need; built by the composition root (`bootstrap.py`) or by a test."""

    service: ChatService
    calls: ChatCalls
    sealer: KeySealer
    balances: BalanceReader
    # Dev sign-in's welcome grant; None = no grant.
    grant_plan: Callable[[str], object] | None = None
    healthy: Callable[[], object] | None = None
    usage: UsageReader | None = None
    # Sign-outs recorded on the server (None: tokens are honoured until they expire).
    sessions: SessionRevocations | None = None


class SettingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: Provider
    # Also a URL path segment at Gemini: only the characters a model id has (DESIGN "Bounds of input").
    model: ModelId
    use_own_key: bool = False
    # Never echoed back, logged or stored; kept only sealed in the session cookie once checked.
    api_key: str | None = Field(default=None, max_length=1024, repr=False)
    # BYOK on and no usable key: run chat on platform credits (True) or refuse it (False, the
    # default); absent = keep the current choice.
    fallback_to_platform: bool | None = None


class ChatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    feature: Feature = Feature.CHAT
    # Its bound (MAX_MESSAGE_CHARS) is checked by the call itself, with a sentence that says the count.
    message: str = Field(min_length=1)
    # Server-Sent Events: `delta` events with the text as it comes, then one `done` or `error`.
    stream: bool = False


class DevLoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.@\-]+$")


def answer(outcome: Outcome) -> JSONResponse:
    """A call's outcome as the plain JSON answer (the same on every retry with its key)."""
    CALLS.labels(
        outcome.body.get("feature", ""), outcome.body.get("key_source", ""), outcome.body.get("ending", "")
    ).inc()
    return JSONResponse(outcome.body, status_code=outcome.status)


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
            CALLS.labels(
                item.body.get("feature", ""), item.body.get("key_source", ""), item.body.get("ending", "")
            ).inc()
            yield sse_event("done" if item.ok else "error", item.body)
        else:
            yield sse_event("delta", {"text": item})


def error_body(code: str, sentence: str) -> dict:
    return {"error": code, "message": sentence}


def is_json(content_type: str | None) -> bool:
    """FastAPI's rule for a JSON body: no Content-Type, application/json or application/*+json."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def create_app(settings: ChatSettings, wire: Callable[[ChatSettings], AbstractAsyncContextManager[Wiring]]) -> FastAPI:
    tokens = TokenReader(settings.auth_jwt_secret)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with wire(settings) as wiring:
            app.state.wiring = wiring
            tokens.revoked = wiring.sessions.is_revoked if wiring.sessions is not None else None
            yield

    app = FastAPI(title="byok-credits: chat service", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Outermost: an oversized body is refused before authentication and parsing.
    app.add_middleware(BodyLimit, max_bytes=settings.http_max_body_bytes, body=error_body)
    # Outside it: the gateway's errors in OpenAI's shape, the body limit's 413 included.
    app.add_middleware(gateway.OpenAIErrors)
    install_outage_handlers(app, error_body)
    install_http_error_handler(app, error_body)

    # Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a thread pool, a
    # thread hand-off per dependency per request for what are microseconds of work.
    async def wiring(request: Request) -> Wiring:
        return request.app.state.wiring

    async def principal(
        authorization: Annotated[str | None, Header()] = None,
        byok_session: Annotated[str | None, Cookie()] = None,
    ) -> Identity:
        return tokens.read(token_from(authorization, byok_session))

    async def session_keys(
        who: Annotated[Identity, Depends(principal)],
        w: Annotated[Wiring, Depends(wiring)],
        byok_key: Annotated[str | None, Cookie()] = None,
    ) -> KeyRing:
        return w.sealer.open(who.user_id, who.session_id, byok_key)

    Who = Annotated[Identity, Depends(principal)]
    Key = Annotated[KeyRing, Depends(session_keys)]
    Wired = Annotated[Wiring, Depends(wiring)]

    def set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name, value, max_age=max_age, httponly=True, secure=settings.cookie_secure, samesite="strict", path="/"
        )

    def drop_cookie(response: Response, name: str) -> None:
        response.delete_cookie(name, path="/", httponly=True, secure=settings.cookie_secure, samesite="strict")

    def keep_keys(response: Response, w: Wiring, who: Identity, ring: KeyRing) -> None:
        """Set the key cookie to exactly `ring` (the keys the server still honours), or drop it."""
        if ring:
            set_cookie(response, KEY_COOKIE, w.sealer.seal(who.user_id, who.session_id, ring), w.sealer.max_age_s(ring))
        else:
            drop_cookie(response, KEY_COOKIE)

    @app.exception_handler(AuthError)
    async def not_authenticated(request: Request, exc: AuthError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            answer = gateway.openai_error(
                401, "invalid_api_key", f"Sign in first: the API key is your identity token ({exc})."
            )
            answer.headers["WWW-Authenticate"] = "Bearer"
            return answer
        return JSONResponse(
            {"error": "not_authenticated", "message": "Sign in first.", "detail": str(exc)},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(ChatRefused)
    async def refused(request: Request, exc: ChatRefused) -> JSONResponse:
        REFUSALS.labels(exc.code).inc()
        if request.url.path.startswith("/v1/"):
            return gateway.refusal(exc)
        return JSONResponse({"error": exc.code, "message": exc.message, **exc.details}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Pydantic's default body echoes the input, which for settings may hold a key: say where, not what.
        if request.url.path.startswith("/v1/"):
            return gateway.openai_error(422, "invalid_request", describe(exc.errors()))
        return JSONResponse(error_body("invalid_request", describe(exc.errors())), status_code=422)

    @app.get("/healthz", responses=HEALTH_RESPONSES)
    async def healthz(w: Wired) -> JSONResponse:
        detail = await w.healthy() if w.healthy else {}
        ok = all(v is not False for v in detail.values())
        return JSONResponse({"status": "ok" if ok else "degraded", **detail}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/config")
    async def config() -> dict:
        """What the page needs before sign-in."""
        prices = default_price_book().in_force(utc_now())
        return {
            "dev_login": settings.dev_login,
            "models": catalog(prices),
            "feature_credits": {f.value: c for f, c in prices.feature_prices.items()},
            "feature_models": {
                f.value: {"provider": p.value, "model": m} for f, (p, m) in settings.feature_models().items()
            },
            "key_lifetime_s": settings.key_ttl_s,
            "price_list_version": prices.version,
        }

    @app.post("/auth/dev-login", responses=error_responses(404, 413, 422))
    async def dev_login(body: DevLoginIn, w: Wired, response: Response) -> dict:
        if not settings.dev_login:
            return JSONResponse({"error": "not_found", "message": "Dev sign-in is off."}, status_code=404)
        token = mint_token(settings.auth_jwt_secret, body.user_id, ttl_s=settings.session_token_ttl_s)
        set_cookie(response, SESSION_COOKIE, token, settings.session_ttl_s)
        drop_cookie(response, KEY_COOKIE)  # a key sealed for an earlier session opens no more anyway
        granted = None
        if w.grant_plan is not None:
            try:
                granted = await w.grant_plan(body.user_id)
            except Exception as exc:  # the sign-in works without its welcome grant
                log.warning("welcome grant for %s failed: %s", body.user_id, exc)
        return {"user_id": body.user_id, "role": "user", "welcome_grant": granted}

    async def sign_out(request: Request, response: Response, w: Wiring, everywhere: bool) -> dict:
        # Signing out works without a valid session too; with one, the session ends on the server (a
        # saved copy of the cookie or the token opens nothing afterwards) and its keys are revoked.
        revoked = 0
        try:
            who = tokens.read(token_from(request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE)))
        except AuthError:
            who = None
        if who is not None:
            if w.sessions is not None:
                await (w.sessions.revoke_everywhere(who.user_id) if everywhere else w.sessions.revoke(who))
            if w.service is not None:
                revoked = await w.service.sign_out(who, everywhere=everywhere)
        drop_cookie(response, SESSION_COOKIE)
        drop_cookie(response, KEY_COOKIE)
        return {"signed_out": True, "everywhere": everywhere, "keys_revoked": revoked}

    @app.post("/auth/logout", responses=error_responses(413))
    async def logout(request: Request, response: Response, w: Wired) -> dict:
        """End this sign-in, on the server."""
        return await sign_out(request, response, w, everywhere=False)

    @app.post("/auth/logout-everywhere", responses=error_responses(413))
    async def logout_everywhere(request: Request, response: Response, w: Wired) -> dict:
        """End every sign-in of the user (every tab, browser and token issued until now)."""
        return await sign_out(request, response, w, everywhere=True)

    @app.get("/api/me", responses=error_responses(401))
    async def me(who: Who, request: Request, response: Response) -> dict:
        """Who is signed in. The page asks every half minute, so a tab notices a sign-out elsewhere;
        a session cookie's short-lived token is renewed here while its sign-in lasts."""
        if request.cookies.get(SESSION_COOKIE) == who.token and not request.headers.get("authorization"):
            now = time.time()
            if (
                now - who.issued_at > settings.session_renew_after_s
                and now - who.session_started < settings.session_ttl_s
            ):
                left = int(settings.session_ttl_s - (now - who.session_started))
                token = mint_token(
                    settings.auth_jwt_secret,
                    who.user_id,
                    who.role,
                    ttl_s=min(settings.session_token_ttl_s, left),
                    session_id=who.session_id,
                    session_started=who.session_started,
                )
                set_cookie(response, SESSION_COOKIE, token, left)
        return {
            "user_id": who.user_id,
            "role": who.role,
            "session_expires_at": int(who.session_started + settings.session_ttl_s),
        }

    @app.get("/api/balance", responses=error_responses(401, 503))
    async def balance(who: Who, w: Wired) -> JSONResponse:
        try:
            funds = await w.balances.funds(who)
            return JSONResponse(
                {"user_id": who.user_id, "balance": funds.balance, "held": funds.held, "available": funds.available}
            )
        except CreditsUnavailable as exc:
            return JSONResponse(
                {
                    "error": "credits_unavailable",
                    "message": "Your balance cannot be read right now.",
                    "detail": str(exc),
                },
                status_code=503,
            )

    @app.get("/api/usage", responses=error_responses(401, 503))
    async def usage(who: Who, w: Wired) -> JSONResponse:
        """The user's last 50 calls (time, feature, provider, model, key source, decision, credits), from
        the ledger through the credit service, and their latest grant."""
        if w.usage is None:
            return JSONResponse(
                {"error": "usage_unavailable", "message": "Usage history is not available here."}, status_code=503
            )
        try:
            return JSONResponse({"user_id": who.user_id, **await w.usage.usage(who, 50)})
        except UsageUnavailable as exc:
            return JSONResponse(
                {
                    "error": "usage_unavailable",
                    "detail": str(exc),
                    "message": "Your usage history cannot be read right now; try again in a minute.",
                },
                status_code=503,
            )

    @app.get("/api/model-settings", responses=error_responses(401, 503))
    async def model_settings(who: Who, ring: Key, w: Wired) -> dict:
        return (await w.service.view(who, ring)).as_dict()

    @app.delete("/api/keys/{provider}", responses=error_responses(401, 422, 503))
    async def remove_key(provider: Provider, who: Who, ring: Key, w: Wired, response: Response) -> dict:
        """Remove this session's key of `provider`: revoked on the server, gone from the cookie."""
        removed = await w.service.remove_key(who, provider)
        view = await w.service.view(who, {p: k for p, k in ring.items() if p is not provider})
        keep_keys(response, w, who, {p: held.key for p, held in view.keys.items()})
        name = providers.of(provider).name
        message = (
            f"Your {name} key was removed from this session; a saved copy of it no longer works here."
            if removed
            else f"There was no {name} key in this session."
        )
        return {"removed": bool(removed), "message": message, "settings": view.as_dict()}

    # 400 is the settings answer itself, with `accepted: false`: the key's check refused it.
    @app.post(
        "/settings/model",
        responses={
            400: {
                "description": "The key was refused by its check; nothing changed",
                "content": {"application/json": {"schema": {"type": "object", "required": ["accepted", "message"]}}},
            },
            **error_responses(401, 409, 413, 422, 503),
        },
    )
    async def update_settings(body: SettingsIn, who: Who, ring: Key, w: Wired, response: Response) -> dict:
        change = await w.service.update_settings(
            who, ring, body.provider, body.model, body.use_own_key, body.api_key, body.fallback_to_platform
        )
        if change.discard_key:
            new_ring: KeyRing = {}
        elif change.keep_key is not None:
            new_ring = {**ring, change.keep_key.provider: change.keep_key}
        else:
            new_ring = ring
        if not change.accepted:
            response.status_code = 400
        view = await w.service.view(who, new_ring)
        if change.discard_key or change.keep_key is not None or len(view.keys) != len(ring):
            keep_keys(response, w, who, {p: held.key for p, held in view.keys.items()})
        answer = {"accepted": change.accepted, "message": change.message, "settings": view.as_dict(), "key_check": None}
        if change.check is not None:
            check = change.check.model_dump(mode="json")
            # The KeyCheckResult's own fields at the top level too (status, message, key_hint, ...).
            # The check's own fields at the top level; the message is the change's (it also says when
            # the earlier key stays in use).
            answer = {**check, **answer, "key_check": check, "message": change.message or change.check.message}
        return answer

    chat_body = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatIn"}}}, "required": True}
    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "One per user action: a retry with the same key within 24 h is the same call",
        "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[\\x21-\\x7e]+$"},
    }

    # The hot route reads its inputs itself rather than through dependencies: FastAPI's dependency
    # solving and response encoding cost more than the rest of the route. Same order as the others
    # (who is calling, then the body), same refusals (401, then 422 through `invalid`).
    @app.post(
        "/chat",
        openapi_extra={"requestBody": chat_body, "parameters": [idempotency_key]},
        responses={
            200: {
                "description": "The answer and its billing; with `stream: true`, Server-Sent Events "
                "(`delta` events, then one `done` or `error`)",
                "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
            },
            **error_responses(401, 402, 409, 413, 422, 502, 503),
        },
    )
    async def chat(request: Request) -> JSONResponse:
        who = tokens.read(token_from(request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE)))
        w: Wiring = request.app.state.wiring
        ring = w.sealer.open(who.user_id, who.session_id, request.cookies.get(KEY_COOKIE))
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
            page_request(body.feature, body.message),
            idempotency_key=request.headers.get("idempotency-key"),
            stream=body.stream,
        )
        if body.stream:
            return StreamingResponse(
                sse(started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        outcome = started if isinstance(started, Outcome) else await started.result()
        return answer(outcome)

    @app.get("/api/calls/{idempotency_key}", responses=error_responses(401, 404, 422))
    async def call_outcome(idempotency_key: str, who: Who, w: Wired) -> JSONResponse:
        """Where the user's call with this Idempotency-Key stands (after a dropped connection): `running`,
        or `ended` with the answer it had (`status`, `answer`). Never starts a call."""
        state, outcome = await w.calls.find(who, idempotency_key)
        if state == "unknown":
            return JSONResponse(
                error_body("not_found", "No call with this key reached the server: it was not charged. Send it again."),
                status_code=404,
            )
        found: dict = {"state": state, "idempotency_key": idempotency_key}
        if outcome is not None:
            found.update(status=outcome.status, answer=outcome.body)
        return JSONResponse(found)

    app.include_router(gateway.create_router(principal, wiring, session_keys))

    def openapi() -> dict:
        # /chat reads its body itself, so FastAPI does not know ChatIn: its schema (and the enums it
        # refers to) go into the components, where the route's $ref points.
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            chat_in = ChatIn.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(chat_in.pop("$defs", {}))
            schemas["ChatIn"] = chat_in
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
    return app
