"""The page, what it needs before sign-in, health and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from billing.pricing import default_price_book
from schemas.events import utc_now
from services.chat.api.deps import Settings, Wired
from services.chat.catalog import catalog, provider_names
from services.shared.edge import HEALTH_RESPONSES

STATIC = Path(__file__).resolve().parents[2] / "static"
router = APIRouter()


@router.get("/healthz", responses=HEALTH_RESPONSES)
async def healthz(w: Wired) -> JSONResponse:
    detail: Any = await w.healthy() if w.healthy else {}  # type: ignore[misc]
    ok = all(v is not False for v in detail.values())
    return JSONResponse({"status": "ok" if ok else "degraded", **detail}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


@router.get("/api/config")
async def config(settings: Settings) -> dict[str, Any]:
    """What the page needs before sign-in."""
    prices = default_price_book().in_force(utc_now())
    return {
        "dev_login": settings.dev_login,
        "models": catalog(prices),
        "provider_names": provider_names(),
        "feature_credits": {f.value: c for f, c in prices.feature_prices.items()},
        "feature_models": {
            f.value: {"provider": p.value, "model": m} for f, (p, m) in settings.feature_models().items()
        },
        "key_lifetime_s": settings.key_ttl_s,
        "price_list_version": prices.version,
    }
