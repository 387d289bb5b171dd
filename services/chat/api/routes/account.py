"""The user's balance and usage, from the credit service."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.chat.api.deps import Who, Wired
from services.chat.credit_account import CreditsUnavailable
from services.chat.usage import UsageUnavailable
from services.shared.edge import error_responses

router = APIRouter()


@router.get("/api/balance", responses=error_responses(401, 503))
async def balance(who: Who, w: Wired) -> JSONResponse:
    try:
        funds = await w.balances.funds(who)
    except CreditsUnavailable as exc:
        return JSONResponse(
            {"error": "credits_unavailable", "message": "Your balance cannot be read right now.", "detail": str(exc)},
            status_code=503,
        )
    return JSONResponse(
        {"user_id": who.user_id, "balance": funds.balance, "held": funds.held, "available": funds.available}
    )


@router.get("/api/usage", responses=error_responses(401, 503))
async def usage(who: Who, w: Wired) -> JSONResponse:
    """The user's last 50 calls (time, feature, provider, model, key source, decision, credits), from the
    ledger through the credit service, and their latest grant."""
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
