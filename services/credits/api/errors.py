"""The credit API's error bodies: `{"detail", "error"}`, and the 402 of a call the credits cannot pay."""

from __future__ import annotations

from fastapi import status
from fastapi.responses import JSONResponse

from services.credits.holds import InsufficientAvailable
from services.credits.ledger import Ledger
from services.shared.edge import refusal


def detail_body(code: str, sentence: str) -> dict[str, str]:
    return {"detail": sentence, "error": code}


async def payment_required(ledger: Ledger, exc: InsufficientAvailable, user_id: str) -> JSONResponse:
    """402: what the call needs, what is available, and what running calls hold meanwhile."""
    held = (await ledger.balance(user_id)).held
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


def ledger_busy(nothing_done: str) -> JSONResponse:
    """503 while the account stays locked (services.credits.holds.LedgerBusy); the client retries."""
    return refusal(
        detail_body,
        status.HTTP_503_SERVICE_UNAVAILABLE,
        f"The credit ledger is busy with this account right now; {nothing_done}. Try again in a moment.",
        {"Retry-After": "2"},
    )
