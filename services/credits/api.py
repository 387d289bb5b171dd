"""HTTP API of the credit service (port 8001): balances, grants, the compatibility route, health, metrics."""


import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated

from aiokafka import AIOKafkaProducer
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from schemas.events import CallStatus, Feature, KeySource, ModelCallCompleted, ModelId, Provider
from schemas.pricing import PriceBook
from services.credits.ledger import GrantConflict, Ledger
from services.credits.settings import CreditSettings
from services.shared.auth import AuthError, Identity, read_token
from services.shared.edge import (
    HEALTH_RESPONSES, BodyLimit, DetailOut, PrintableId, describe, error_responses, install_http_error_handler,
    install_outage_handlers,
)

# Namespace of the event ids the compatibility route derives from (user, idempotency key).
DEDUCT_NAMESPACE = uuid.UUID("5b0c8a52-4f8e-4d7e-9d0c-3f5f2b7c1e01")

_PROVIDER_PREFIXES = [
    (("gpt-", "o1", "o3", "o4", "chatgpt"), Provider.OPENAI),
    (("claude",), Provider.ANTHROPIC),
    (("gemini",), Provider.GEMINI),
    (("llama", "gemma", "qwen", "deepseek", "mistral", "mixtral"), Provider.GROQ),
]


def infer_provider(model: str) -> Provider | None:
    for prefixes, provider in _PROVIDER_PREFIXES:
        if model.startswith(prefixes):
            return provider
    return None


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


@dataclass
class ApiContext:
    settings: CreditSettings
    ledger: Ledger
    book: PriceBook
    producer: AIOKafkaProducer | None
    consumer_running: Callable[[], bool] = lambda: True


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

    def identity(authorization: Annotated[str | None, Header()] = None) -> Identity:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "send a bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            return read_token(ctx.settings.auth_jwt_secret, authorization[7:].strip())
        except AuthError as exc:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"})

    Caller = Annotated[Identity, Depends(identity)]

    @app.get("/healthz", responses=HEALTH_RESPONSES)
    async def healthz() -> JSONResponse:
        try:
            await ctx.ledger.pool.fetchval("SELECT 1")
            db = True
        except Exception:
            db = False
        ok = db and ctx.consumer_running()
        return JSONResponse({"status": "ok" if ok else "degraded", "database": db,
                             "consumer": ctx.consumer_running()}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/credits/{user_id}", responses=error_responses(401, 403, 422, 503, model=DetailOut))
    async def balance(user_id: Annotated[PrintableId, Path()], caller: Caller) -> dict:
        if not caller.may_act_for(user_id):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "you may only see your own balance")
        b = await ctx.ledger.balance(user_id)
        return {"user_id": b.user_id, "balance": b.balance, "granted": b.granted, "debited": b.debited}

    @app.post("/api/admin/grants", status_code=status.HTTP_201_CREATED,
              responses={200: {"description": "Granted before under this key"},
                         **error_responses(401, 403, 409, 413, 422, 503, model=DetailOut)})
    async def grant(body: GrantIn, caller: Caller, response: Response) -> dict:
        if not caller.is_admin:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "only an admin may grant credits")
        plans = ctx.book.in_force(datetime.now(timezone.utc)).plans
        if body.plan not in plans:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"unknown plan {body.plan!r}; plans are {sorted(plans)}")
        try:
            created, b = await ctx.ledger.grant(body.grant_key, body.user_id, body.plan, plans[body.plan])
        except GrantConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc))
        response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return {"grant_key": body.grant_key, "user_id": body.user_id, "plan": body.plan,
                "credits": plans[body.plan], "created": created, "balance": b.balance}

    @app.post("/api/user/deduct-credits",
              responses={202: {"description": "Recorded; the decision is still pending"},
                         **error_responses(401, 413, 422, 503, model=DetailOut)})
    async def deduct(body: DeductIn, caller: Caller, response: Response) -> dict:
        """Publishes the call as a `model_call_completed` event (so the log stays the source of
        truth) and answers with the decision the credit consumer made for it."""
        provider = body.provider or infer_provider(body.model)
        if provider is None:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"cannot tell the provider of model {body.model!r}; send 'provider'")
        event_id = uuid.uuid5(DEDUCT_NAMESPACE, f"{caller.user_id}\x00{body.idempotency_key}")
        decided = await ctx.ledger.decision_of(event_id)
        if decided is None:
            if ctx.producer is None:
                raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the event log is not reachable")
            event = ModelCallCompleted(
                event_id=event_id, occurred_at=datetime.now(timezone.utc), user_id=caller.user_id,
                session_id="compat", request_id=body.idempotency_key, provider=provider, model=body.model,
                feature=body.feature, key_source=body.key_source, status=CallStatus.SUCCEEDED,
                input_tokens=0, output_tokens=0, latency_ms=0,
            )
            await ctx.producer.send_and_wait(
                ctx.settings.model_call_completed_topic, event.to_json(), key=caller.user_id.encode()
            )
            deadline = asyncio.get_running_loop().time() + ctx.settings.deduct_wait_s
            while decided is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
                decided = await ctx.ledger.decision_of(event_id)
        if decided is None:
            response.status_code = status.HTTP_202_ACCEPTED
            return {"event_id": str(event_id), "decision": "pending"}
        b = await ctx.ledger.balance(caller.user_id)
        return {"event_id": str(event_id), "decision": decided["decision"], "credits": decided["credits"],
                "reason": decided["reason"], "price_list_version": decided["price_list_version"],
                "key_source": body.key_source.value, "balance": b.balance}

    return app
