"""Sign-in (dev), sign-out (this session, or everywhere), and who is signed in."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.chat.api.deps import Settings, Who, Wired, drop_cookie, identify, set_cookie
from services.chat.identity import SESSION_COOKIE, AuthError, mint_token
from services.chat.key_session import KEY_COOKIE
from services.chat.settings import ChatSettings
from services.chat.wiring import Wiring
from services.shared.edge import error_responses

log = logging.getLogger(__name__)
router = APIRouter()


class DevLoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.@\-]+$")


@router.post("/auth/dev-login", responses=error_responses(404, 413, 422))
async def dev_login(body: DevLoginIn, w: Wired, settings: Settings, response: Response) -> Any:
    if not settings.dev_login:
        return JSONResponse({"error": "not_found", "message": "Dev sign-in is off."}, status_code=404)
    token = mint_token(settings.auth_jwt_secret, body.user_id, ttl_s=settings.session_token_ttl_s)
    set_cookie(response, settings, SESSION_COOKIE, token, settings.session_ttl_s)
    drop_cookie(response, settings, KEY_COOKIE)  # a key sealed for an earlier session opens no more anyway
    granted = None
    if w.grant_plan is not None:
        try:
            granted = await w.grant_plan(body.user_id)  # type: ignore[misc]
        except Exception as exc:  # the sign-in works without its welcome grant
            log.warning("welcome grant for %s failed: %s", body.user_id, exc)
    return {"user_id": body.user_id, "role": "user", "welcome_grant": granted}


async def sign_out(
    request: Request, response: Response, w: Wiring, settings: ChatSettings, everywhere: bool
) -> dict[str, Any]:
    """Signing out works without a valid session too; with one, the session ends on the server (a saved
    copy of the cookie or the token opens nothing afterwards) and its keys are revoked."""
    revoked = 0
    try:
        who = identify(request)
    except AuthError:
        who = None
    if who is not None:
        if w.sessions is not None:
            await (w.sessions.revoke_everywhere(who.user_id) if everywhere else w.sessions.revoke(who))
        if w.service is not None:
            revoked = await w.service.sign_out(who, everywhere=everywhere)
    drop_cookie(response, settings, SESSION_COOKIE)
    drop_cookie(response, settings, KEY_COOKIE)
    return {"signed_out": True, "everywhere": everywhere, "keys_revoked": revoked}


@router.post("/auth/logout", responses=error_responses(413))
async def logout(request: Request, response: Response, w: Wired, settings: Settings) -> dict[str, Any]:
    """End this sign-in, on the server."""
    return await sign_out(request, response, w, settings, everywhere=False)


@router.post("/auth/logout-everywhere", responses=error_responses(413))
async def logout_everywhere(request: Request, response: Response, w: Wired, settings: Settings) -> dict[str, Any]:
    """End every sign-in of the user (every tab, browser and token issued until now)."""
    return await sign_out(request, response, w, settings, everywhere=True)


@router.get("/api/me", responses=error_responses(401))
async def me(who: Who, settings: Settings, request: Request, response: Response) -> dict[str, Any]:
    """Who is signed in. The page asks every half minute, so a tab notices a sign-out elsewhere; a
    session cookie's short-lived token is renewed here while its sign-in lasts."""
    if request.cookies.get(SESSION_COOKIE) == who.token and not request.headers.get("authorization"):
        now = time.time()
        if now - who.issued_at > settings.session_renew_after_s and now - who.session_started < settings.session_ttl_s:
            left = int(settings.session_ttl_s - (now - who.session_started))
            token = mint_token(
                settings.auth_jwt_secret,
                who.user_id,
                who.role,
                ttl_s=min(settings.session_token_ttl_s, left),
                session_id=who.session_id,
                session_started=who.session_started,
            )
            set_cookie(response, settings, SESSION_COOKIE, token, left)
    return {
        "user_id": who.user_id,
        "role": who.role,
        "session_expires_at": int(who.session_started + settings.session_ttl_s),
    }
