"""HTTP API of the credit service (port 8001): balances, grants, the compatibility route, health, metrics."""

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from billing.policy import UnpricedModel, price_of
from billing.pricing import PriceBook
from schemas.events import Feature, KeySource, ModelId, Provider
from services.credits import metrics as credit_metrics
from services.credits.compat import CompatDeductions, DeductCall, KeyReused, UnknownProvider
from services.credits.consumer import StallWatch
from services.credits.ledger import GrantConflict, HoldConflict, InsufficientAvailable, Ledger, LedgerBusy
from services.credits.settings import CreditSettings
from services.shared.auth import AuthError, Identity, read_token
from services.shared.edge import (
    HEALTH_RESPONSES,
    BodyLimit,
    DetailOut,
    ErrorOut,
    PrintableId,
    describe,
    error_responses,
    install_http_error_handler,
    install_outage_handlers,
)
from services.shared.sessions import SessionRevocations


class GrantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grant_key: PrintableId = Field(description="Idempotency key of this grant")
    user_id: PrintableId
    plan: PrintableId = Field(description="A plan of the price list: its amount is granted")


class DeductIn(BaseModel):
    """Old clients' route. There is deliberately no amount: the server's policy decides it."""

    model_config = ConfigDict(extra="forbid")
    feature: Feature
    model: ModelId
    key_source: KeySource
    idempotency_key: PrintableId
    provider: Provider | None = None


class HoldIn(BaseModel):
    """A reservation for one billable call. There is deliberately no amount: the price list decides it."""

    model_config = ConfigDict(extra="forbid")
    event_id: uuid.UUID = Field(description="The call's event id: the hold is settled when this event is decided")
    feature: Feature
    provider: Provider
    model: ModelId


@dataclass
class ApiContext:
    settings: CreditSettings
    ledger: Ledger
    book: PriceBook
    consumer_running: Callable[[], bool] = lambda: True
    stall: StallWatch | None = None  # None: no consumer in this process
    # Sign-outs recorded by the chat (services/shared/sessions.py): a signed-out token opens nothing here.
    sessions: SessionRevocations | None = None


def detail_body(code: str, sentence: str) -> dict:
    return {"detail": sentence, "error": code}


def build_api(ctx: ApiContext) -> FastAPI:
    app = FastAPI(title="byok-credits: credit service", version="1")
    # Outermost: an oversized body is refused before authentication and parsing.
    app.add_middleware(BodyLimit, max_bytes=ctx.settings.http_max_body_bytes, body=detail_body)
    install_outage_handlers(app, detail_body)
    install_http_error_handler(app, detail_body)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(detail_body("invalid_request", describe(exc.errors())), status_code=422)

    # async: a plain `def` dependency would run in a worker thread, one thread hop per request.
    async def identity(authorization: Annotated[str | None, Header()] = None) -> Identity:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "send a bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        try:
            who = read_token(ctx.settings.auth_jwt_secret, authorization[7:].strip())
        except AuthError as exc:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc
        if ctx.sessions is not None and ctx.sessions.is_revoked(who):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "this session was signed out; sign in again",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return who

    Caller = Annotated[Identity, Depends(identity)]

    async def payment_required(exc: InsufficientAvailable, user_id: str) -> JSONResponse:
        """402: what the call needs, what is available, and what running calls hold meanwhile."""
        held = (await ctx.ledger.balance(user_id)).held
        running = f" ({held} more are held by calls still running)" if held else ""
        return JSONResponse(
            status_code=status.HTTP_402_PAYMENT_REQUIRED,
            content={
                "error": "insufficient_credits",
                "needed": exc.needed,
                "available": exc.available,
                "held": held,
                "message": f"This call costs {exc.needed} credits and you have {exc.available} available{running}.",
            },
        )

    @app.get("/healthz", responses=HEALTH_RESPONSES)
    async def healthz() -> JSONResponse:
        try:
            await ctx.ledger.pool.fetchval("SELECT 1")
            db = True
        except Exception:
            db = False
        stalled = ctx.stall is not None and ctx.stall.check()
        ok = db and ctx.consumer_running() and not stalled
        body = {"status": "ok" if ok else "degraded", "database": db, "consumer": ctx.consumer_running()}
        if ctx.stall is not None:
            body.update(
                stalled=stalled,
                stall_seconds=round(ctx.stall.stall_seconds(), 1),
                events_waiting=ctx.stall.pipeline.pending + (ctx.stall.lag or 0),
            )
        if stalled:
            body["message"] = (
                f"billing is stalled: events wait and the ledger has not committed for "
                f"{ctx.stall.stall_seconds():.0f} s (see the service's log)"
            )
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        try:  # holds never lapse: how many are open and how old the oldest is, as the database has them now
            stats = await asyncio.wait_for(ctx.ledger.hold_stats(), 2.0)
            credit_metrics.HOLDS_OPEN.set(stats.open)
            credit_metrics.HOLDS_CREDITS.set(stats.credits)
            credit_metrics.OLDEST_HOLD_AGE.set(stats.oldest_age_s)
        except Exception:  # the database away: the rest of the metrics still answer (holds keep their last value)
            pass
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/credits/{user_id}", responses=error_responses(401, 403, 422, 503, model=DetailOut))
    async def balance(user_id: Annotated[PrintableId, Path()], caller: Caller) -> dict:
        if not caller.may_act_for(user_id):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "you may only see your own balance")
        b = await ctx.ledger.balance(user_id)
        return {
            "user_id": b.user_id,
            "balance": b.balance,
            "granted": b.granted,
            "debited": b.debited,
            "held": b.held,
            "available": b.available,
        }

    @app.post(
        "/api/holds",
        status_code=status.HTTP_201_CREATED,
        responses={
            200: {"description": "The same hold was placed before"},
            **error_responses(401, 409, 413, 422, 503, model=DetailOut),
            402: {"description": "Not enough available credits; nothing is held", "model": ErrorOut},
        },
    )
    async def place_hold(body: HoldIn, caller: Caller, response: Response) -> dict:
        """Reserve the price of one billable call before it starts (admission hold).

        The hold has no expiry: it lasts until the call's event is decided (whatever the decision) or
        the caller releases it with DELETE /api/holds/{event_id} (the provider was never called)."""
        prices = ctx.book.in_force(datetime.now(timezone.utc))
        try:
            credits = price_of(body.feature, body.model, prices)
        except UnpricedModel as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
        try:
            hold = await ctx.ledger.place_hold(
                body.event_id,
                caller.user_id,
                credits,
                prices.version,
                feature=body.feature.value,
                provider=body.provider.value,
                model=body.model,
            )
        except InsufficientAvailable as exc:
            return await payment_required(exc, caller.user_id)
        except HoldConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        except LedgerBusy:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "The credit ledger is busy with this account right now; nothing was held. Try again in a moment.",
                headers={"Retry-After": "2"},
            ) from None
        if not hold.created:
            response.status_code = status.HTTP_200_OK
        return {
            "event_id": str(hold.event_id),
            "credits": hold.credits,
            "available": hold.available,
            "price_list_version": hold.price_list_version,
            "created": hold.created,
        }

    @app.delete("/api/holds/{event_id}", responses=error_responses(401, 404, 422, 503, model=DetailOut))
    async def release_hold(event_id: uuid.UUID, caller: Caller) -> dict:
        """Release the hold of a call that never reached the provider."""
        released = await ctx.ledger.release_hold(event_id, None if caller.is_admin else caller.user_id)
        if released is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such hold (it may already be settled or released)")
        b = await ctx.ledger.balance(caller.user_id)
        return {"event_id": str(event_id), "released": released, "available": b.available}

    @app.get("/api/admin/holds", responses=error_responses(401, 403, 422, 503, model=DetailOut))
    async def old_holds(
        caller: Caller,
        older_than_s: Annotated[float | None, Query(ge=0, le=10 * 365 * 86400)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> dict:
        """Admission holds placed more than `older_than_s` seconds ago (default HOLD_REPORT_AFTER_S), oldest
        first. A hold never expires: one listed here waits for its event's decision. If the call
        provably never reached the provider, DELETE /api/holds/{event_id} (admin token) releases it."""
        if not caller.is_admin:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "only an admin may list holds")
        age = ctx.settings.hold_report_after_s if older_than_s is None else older_than_s
        total, rows = await ctx.ledger.old_holds(age, limit)
        return {
            "older_than_s": age,
            "count": total,
            "holds": [
                {
                    "event_id": str(r["event_id"]),
                    "user_id": r["user_id"],
                    "credits": r["credits"],
                    "feature": r["feature"],
                    "provider": r["provider"],
                    "model": r["model"],
                    "price_list_version": r["price_list_version"],
                    "placed_at": r["placed_at"].isoformat(),
                    "age_s": round(r["age_s"], 1),
                    "decided": r["decided"],
                }
                for r in rows
            ],
        }

    @app.get("/api/usage/{user_id}", responses=error_responses(401, 403, 422, 503, model=DetailOut))
    async def usage(user_id: Annotated[PrintableId, Path()], caller: Caller, limit: int = 50) -> dict:
        """The user's last calls as the ledger decided them (newest first) and their latest grant."""
        if not caller.may_act_for(user_id):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "you may only see your own usage")
        if not 1 <= limit <= 200:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "limit is 1 to 200")
        calls, grant = await ctx.ledger.usage(user_id, limit)
        return {
            "user_id": user_id,
            "calls": [
                {
                    "time": (c["occurred_at"] or c["recorded_at"]).isoformat(),
                    "feature": c["feature"],
                    "provider": c["provider"],
                    "model": c["model"],
                    "key_source": c["key_source"],
                    "status": c["status"],
                    "decision": c["decision"],
                    "credits": c["credits"],
                }
                for c in calls
            ],
            "last_grant": None
            if grant is None
            else {"plan": grant["plan"], "credits": grant["credits"], "granted_at": grant["granted_at"].isoformat()},
        }

    @app.post(
        "/api/admin/grants",
        status_code=status.HTTP_201_CREATED,
        responses={
            200: {"description": "Granted before under this key"},
            **error_responses(401, 403, 409, 413, 422, 503, model=DetailOut),
        },
    )
    async def grant(body: GrantIn, caller: Caller, response: Response) -> dict:
        if not caller.is_admin:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "only an admin may grant credits")
        plans = ctx.book.in_force(datetime.now(timezone.utc)).plans
        if body.plan not in plans:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"unknown plan {body.plan!r}; plans are {sorted(plans)}"
            )
        try:
            created, b = await ctx.ledger.grant(body.grant_key, body.user_id, body.plan, plans[body.plan])
        except GrantConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return {
            "grant_key": body.grant_key,
            "user_id": body.user_id,
            "plan": body.plan,
            "credits": plans[body.plan],
            "created": created,
            "balance": b.balance,
        }

    deductions = CompatDeductions(
        ctx.ledger, ctx.book, ctx.settings.model_call_completed_topic, ctx.settings.deduct_wait_s
    )

    @app.post(
        "/api/user/deduct-credits",
        responses={
            202: {"description": "Recorded (and held, when it may debit); the decision is still pending"},
            **error_responses(401, 409, 413, 422, 503, model=DetailOut),
            402: {"description": "Not enough available credits; nothing is held or recorded", "model": ErrorOut},
        },
    )
    async def deduct(body: DeductIn, caller: Caller, response: Response) -> dict:
        """Reports one call of an old client (services.credits.compat): held like a chat call when it
        may debit, recorded as a `model_call_completed` event, and answered with the credit consumer's
        decision; 402 when the available credits cannot pay for it."""
        call = DeductCall(
            caller.user_id, body.feature, body.model, body.key_source, body.idempotency_key, body.provider
        )
        try:
            done = await deductions.deduct(call)
        except (UnknownProvider, UnpricedModel) as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
        except InsufficientAvailable as exc:
            return await payment_required(exc, caller.user_id)
        except KeyReused as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        except LedgerBusy:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "The credit ledger is busy with this account right now; nothing was held or recorded. "
                "Try again in a moment.",
                headers={"Retry-After": "2"},
            ) from None
        if done.decision is None:
            response.status_code = status.HTTP_202_ACCEPTED
            return {"event_id": str(done.event_id), "decision": "pending", "held": done.held}
        d = done.decision
        return {
            "event_id": str(done.event_id),
            "decision": d["decision"],
            "credits": d["credits"],
            "reason": d["reason"],
            "price_list_version": d["price_list_version"],
            "key_source": d["key_source"],
            "balance": done.balance,
        }

    return app
