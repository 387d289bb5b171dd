"""The routes' shared dependencies, as typed aliases (`Who`, `Key`, `Wired`, `Settings`), and the
session cookies. Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a thread
pool, a thread hand-off per dependency per request for what are microseconds of work."""

from __future__ import annotations

from typing import Annotated

from fastapi import Cookie, Depends, Header, Request, Response

from services.chat.identity import SESSION_COOKIE, Identity, TokenReader, token_from
from services.chat.key_session import KEY_COOKIE, KeyRing
from services.chat.settings import ChatSettings
from services.chat.wiring import Wiring


async def wiring(request: Request) -> Wiring:
    wired: Wiring = request.app.state.wiring
    return wired


async def chat_settings(request: Request) -> ChatSettings:
    settings: ChatSettings = request.app.state.settings
    return settings


def tokens_of(request: Request) -> TokenReader:
    reader: TokenReader = request.app.state.tokens
    return reader


def identify(request: Request) -> Identity:
    """Who is calling: the bearer token, else the session cookie's (raises `AuthError`)."""
    return tokens_of(request).read(
        token_from(request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE))
    )


async def principal(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    byok_session: Annotated[str | None, Cookie()] = None,
) -> Identity:
    return tokens_of(request).read(token_from(authorization, byok_session))


async def session_keys(
    who: Annotated[Identity, Depends(principal)],
    w: Annotated[Wiring, Depends(wiring)],
    byok_key: Annotated[str | None, Cookie()] = None,
) -> KeyRing:
    return w.key_cookie.open(who.user_id, who.session_id, byok_key)


Who = Annotated[Identity, Depends(principal)]
Key = Annotated[KeyRing, Depends(session_keys)]
Wired = Annotated[Wiring, Depends(wiring)]
Settings = Annotated[ChatSettings, Depends(chat_settings)]


def set_cookie(response: Response, settings: ChatSettings, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, httponly=True, secure=settings.cookie_secure, samesite="strict", path="/"
    )


def drop_cookie(response: Response, settings: ChatSettings, name: str) -> None:
    response.delete_cookie(name, path="/", httponly=True, secure=settings.cookie_secure, samesite="strict")


def keep_keys(response: Response, settings: ChatSettings, w: Wiring, who: Identity, ring: KeyRing) -> None:
    """Set the key cookie to exactly `ring` (the keys the server still honours), or drop it."""
    if ring:
        seal = w.key_cookie.seal(who.user_id, who.session_id, ring)
        set_cookie(response, settings, KEY_COOKIE, seal, w.key_cookie.max_age_s(ring))
    else:
        drop_cookie(response, settings, KEY_COOKIE)
