"""The routes' shared dependencies as typed aliases (`Context`, `Deductions`, `Caller`).

Dependencies are `async def` on purpose: FastAPI runs a plain `def` one in a worker thread, one thread
hop per request for microseconds of work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status

from billing.pricing import PriceBook
from services.credits.compat import CompatDeductions
from services.credits.health import StallWatch
from services.credits.ledger import Ledger
from services.credits.settings import CreditSettings
from services.shared.auth import AuthError, Identity, TokenReader
from services.shared.sessions import SessionRevocations


def _always() -> bool:
    return True


@dataclass
class ApiContext:
    """What the routes work with, built by the composition root (services.credits.bootstrap)."""

    settings: CreditSettings
    ledger: Ledger
    book: PriceBook
    consumer_running: Callable[[], bool] = _always
    stall: StallWatch | None = None  # None: no consumer in this process
    # Sign-outs recorded by the chat (services/shared/sessions.py): a signed-out token opens nothing here.
    sessions: SessionRevocations | None = None
    # The bearer tokens verified so far (each until its expiry): the chat sends one user's token with
    # every hold of that user's calls.
    tokens: TokenReader = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenReader(self.settings.auth_jwt_secret)


async def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


async def deductions(request: Request) -> CompatDeductions:
    use_case: CompatDeductions = request.app.state.deductions
    return use_case


Context = Annotated[ApiContext, Depends(context)]
Deductions = Annotated[CompatDeductions, Depends(deductions)]


def caller_of(ctx: ApiContext, authorization: str | None) -> Identity:
    """The caller of a bearer token that is valid and not signed out; AuthError (with why) otherwise.
    The route dependency below and the holds' short path (services.credits.api.hold_path) check with it."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise AuthError("send a bearer token")
    who = ctx.tokens.read(authorization[7:].strip())
    if ctx.sessions is not None and ctx.sessions.is_revoked(who):
        raise AuthError("this session was signed out; sign in again")
    return who


async def identity(ctx: Context, authorization: Annotated[str | None, Header()] = None) -> Identity:
    """The caller of a bearer token that is valid and not signed out; 401 otherwise."""
    try:
        return caller_of(ctx, authorization)
    except AuthError as exc:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc


Caller = Annotated[Identity, Depends(identity)]
