"""Admission holds: POST /api/holds, DELETE /api/holds/{event_id}, GET /api/admin/holds (the old ones)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from billing.policy import UnpricedModel, price_of
from schemas.events import Feature, ModelId, Provider
from services.credits.api.deps import ApiContext, Caller, Context
from services.credits.api.errors import detail_body, ledger_busy, payment_required
from services.credits.holds import Hold, HoldConflict, InsufficientAvailable, LedgerBusy
from services.shared.edge import DetailOut, ErrorOut, error_responses, refusal

router = APIRouter()


class HoldIn(BaseModel):
    """A reservation for one billable call. There is deliberately no amount: the price list decides it."""

    model_config = ConfigDict(extra="forbid")
    event_id: uuid.UUID = Field(description="The call's event id: the hold is settled when this event is decided")
    feature: Feature
    provider: Provider
    model: ModelId


@router.post(
    "/api/holds",
    response_model=dict,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"description": "The same hold was placed before"},
        **error_responses(401, 409, 413, 422, 503, model=DetailOut),
        402: {"description": "Not enough available credits; nothing is held", "model": ErrorOut},
    },
)
async def place_hold(body: HoldIn, caller: Caller, ctx: Context) -> Response:
    """Reserve the price of one billable call before it starts (admission hold).

    The hold has no expiry: it lasts until the call's event is decided (whatever the decision) or
    the caller releases it with DELETE /api/holds/{event_id} (the provider was never called)."""
    return await hold_response(ctx, body, caller.user_id)


async def hold_response(ctx: ApiContext, body: HoldIn, user_id: str) -> Response:
    """Place the hold of one call at the price in force, and the answer to it: 201 placed, 200 placed
    before, 402, 409, 422 (no price) or 503 (account locked). The route and the short path
    (services.credits.api.hold_path) answer with this."""
    prices = ctx.book.in_force(datetime.now(timezone.utc))
    try:
        credits = price_of(body.feature, body.model, prices)
        hold = await ctx.ledger.place_hold(
            body.event_id,
            user_id,
            credits,
            prices.version,
            feature=body.feature.value,
            provider=body.provider.value,
            model=body.model,
        )
    except UnpricedModel as exc:
        return refusal(detail_body, status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc))
    except InsufficientAvailable as exc:
        return await payment_required(ctx.ledger, exc, user_id)
    except HoldConflict as exc:
        return refusal(detail_body, status.HTTP_409_CONFLICT, str(exc))
    except LedgerBusy:
        return ledger_busy("nothing was held")
    return JSONResponse(hold_answer(hold), status_code=status.HTTP_201_CREATED if hold.created else status.HTTP_200_OK)


def hold_answer(hold: Hold) -> dict[str, object]:
    """The body of 201 (placed now) and 200 (placed before)."""
    return {
        "event_id": str(hold.event_id),
        "credits": hold.credits,
        "available": hold.available,
        "price_list_version": hold.price_list_version,
        "created": hold.created,
    }


@router.delete(
    "/api/holds/{event_id}", response_model=dict, responses=error_responses(401, 404, 422, 503, model=DetailOut)
)
async def release_hold(event_id: uuid.UUID, caller: Caller, ctx: Context) -> dict[str, object]:
    """Release the hold of a call that never reached the provider."""
    released = await ctx.ledger.release_hold(event_id, None if caller.is_admin else caller.user_id)
    if released is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such hold (it may already be settled or released)")
    b = await ctx.ledger.balance(caller.user_id)
    return {"event_id": str(event_id), "released": released, "available": b.available}


@router.get("/api/admin/holds", response_model=dict, responses=error_responses(401, 403, 422, 503, model=DetailOut))
async def old_holds(
    caller: Caller,
    ctx: Context,
    older_than_s: Annotated[float | None, Query(ge=0, le=10 * 365 * 86400)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, object]:
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
