"""Grants: POST /api/admin/grants (an admin adds a plan's credits to an account, once per grant key)."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, HTTPException, Response, status
from pydantic import BaseModel, ConfigDict, Field

from services.credits.api.deps import Caller, Context
from services.credits.ledger import GrantConflict
from services.shared.edge import DetailOut, PrintableId, error_responses

router = APIRouter()


class GrantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grant_key: PrintableId = Field(description="Idempotency key of this grant")
    user_id: PrintableId
    plan: PrintableId = Field(description="A plan of the price list: its amount is granted")


@router.post(
    "/api/admin/grants",
    response_model=dict,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"description": "Granted before under this key"},
        **error_responses(401, 403, 409, 413, 422, 503, model=DetailOut),
    },
)
async def grant(body: GrantIn, caller: Caller, ctx: Context, response: Response) -> dict[str, object]:
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
