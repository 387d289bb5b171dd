"""The compatibility route: POST /api/user/deduct-credits, old clients' calls (use case: services.credits.compat)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from billing.policy import UnpricedModel
from schemas.events import Feature, KeySource, ModelId, Provider
from services.credits.api.deps import Caller, Context, Deductions
from services.credits.api.errors import ledger_busy, payment_required
from services.credits.compat import DeductCall, KeyReused, UnknownProvider
from services.credits.holds import InsufficientAvailable, LedgerBusy
from services.shared.edge import DetailOut, ErrorOut, PrintableId, error_responses

router = APIRouter()


class DeductIn(BaseModel):
    """Old clients' route. There is deliberately no amount: the server's policy decides it."""

    model_config = ConfigDict(extra="forbid")
    feature: Feature
    model: ModelId
    key_source: KeySource
    idempotency_key: PrintableId
    provider: Provider | None = None


@router.post(
    "/api/user/deduct-credits",
    response_model=dict,
    responses={
        202: {"description": "Recorded (and held, when it may debit); the decision is still pending"},
        **error_responses(401, 409, 413, 422, 503, model=DetailOut),
        402: {"description": "Not enough available credits; nothing is held or recorded", "model": ErrorOut},
    },
)
async def deduct(
    body: DeductIn, caller: Caller, ctx: Context, deductions: Deductions, response: Response
) -> dict[str, object] | JSONResponse:
    """Reports one call of an old client (services.credits.compat): held like a chat call when it
    may debit, recorded as a `model_call_completed` event, and answered with the credit consumer's
    decision; 402 when the available credits cannot pay for it."""
    call = DeductCall(caller.user_id, body.feature, body.model, body.key_source, body.idempotency_key, body.provider)
    try:
        done = await deductions.deduct(call)
    except (UnknownProvider, UnpricedModel) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    except InsufficientAvailable as exc:
        return await payment_required(ctx.ledger, exc, caller.user_id)
    except KeyReused as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except LedgerBusy:
        return ledger_busy("nothing was held or recorded")
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
