"""Health and metrics: GET /healthz (database, consumer, stall watch) and GET /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.credits import metrics as credit_metrics
from services.credits.api.deps import Context
from services.credits.health import health_report
from services.shared.edge import HEALTH_RESPONSES

router = APIRouter()


@router.get("/healthz", responses=HEALTH_RESPONSES)
async def healthz(ctx: Context) -> JSONResponse:
    try:
        await ctx.ledger.pool.fetchval("SELECT 1")
        db = True
    except Exception:
        db = False
    body, ok = health_report(db, ctx.consumer_running(), ctx.stall)
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(ctx: Context) -> Response:
    try:  # holds never lapse: how many are open and how old the oldest is, as the database has them now
        stats = await asyncio.wait_for(ctx.ledger.hold_stats(), 2.0)
        credit_metrics.HOLDS_OPEN.set(stats.open)
        credit_metrics.HOLDS_CREDITS.set(stats.credits)
        credit_metrics.OLDEST_HOLD_AGE.set(stats.oldest_age_s)
    except Exception:  # the database away: the rest of the metrics still answer (holds keep their last value)
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
