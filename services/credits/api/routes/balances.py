"""A user's account: GET /api/credits/{user_id} (balance) and GET /api/usage/{user_id} (decided calls)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from services.credits.api.deps import Caller, Context
from services.shared.edge import DetailOut, PrintableId, error_responses

router = APIRouter()


# response_model=dict: the documents say "an object", as they did before the routes were typed.
@router.get(
    "/api/credits/{user_id}", response_model=dict, responses=error_responses(401, 403, 422, 503, model=DetailOut)
)
async def balance(user_id: Annotated[PrintableId, Path()], caller: Caller, ctx: Context) -> dict[str, object]:
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


@router.get("/api/usage/{user_id}", response_model=dict, responses=error_responses(401, 403, 422, 503, model=DetailOut))
async def usage(
    user_id: Annotated[PrintableId, Path()], caller: Caller, ctx: Context, limit: int = 50
) -> dict[str, object]:
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
