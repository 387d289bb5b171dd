"""The credit service's FastAPI application: the edge's error handling and the routers of `routes/`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp

from services.credits.api.deps import ApiContext
from services.credits.api.errors import detail_body
from services.credits.api.hold_path import HoldPath
from services.credits.api.routes import balances, compat, grants, health, holds
from services.credits.compat import CompatDeductions
from services.shared.edge import BodyLimit, describe, install_http_error_handler, install_outage_handlers

__all__ = ["ApiContext", "build_api"]


def build_api(ctx: ApiContext) -> ASGIApp:
    """The API: FastAPI's routes behind the admission hold's short path (services.credits.api.hold_path)."""
    app = FastAPI(title="byok-credits: credit service", version="1")
    app.state.ctx = ctx
    app.state.deductions = CompatDeductions(
        ctx.ledger, ctx.book, ctx.settings.model_call_completed_topic, ctx.settings.deduct_wait_s
    )
    # Outermost: an oversized body is refused before authentication and parsing.
    app.add_middleware(BodyLimit, max_bytes=ctx.settings.http_max_body_bytes, body=detail_body)
    install_outage_handlers(app, detail_body)
    install_http_error_handler(app, detail_body)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(detail_body("invalid_request", describe(exc.errors())), status_code=422)

    for topic in (health, balances, holds, grants, compat):
        app.include_router(topic.router)
    return HoldPath(app, ctx, ctx.settings.http_max_body_bytes)
