"""Who is calling: a signed token (JWT HS256; `sub` = user id, `role` = "admin" for admin routes).

The token comes from an `Authorization: Bearer` header (API clients) or from the HttpOnly session
cookie set by the dev sign-in (the page). Identity never comes from a request body.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.shared.auth import AuthError, Identity, mint_token, read_token

__all__ = ["SESSION_COOKIE", "AuthError", "Identity", "TokenReader", "mint_token", "read_token", "token_from"]

SESSION_COOKIE = "byok_session"


def token_from(authorization: str | None, cookie: str | None) -> str:
    """The bearer token if one is sent, else the session cookie's."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError("use 'Authorization: Bearer <token>'")
        return value.strip()
    if cookie:
        return cookie
    raise AuthError("sign in first")


class TokenReader:
    """`read_token` that remembers the tokens it has verified, until each one's expiry.

    A client sends the same token with every request; checking its signature each time is a fifth
    of the work of a chat call's own route. A remembered token is still refused once expired, and a
    token never verified (forged, malformed) is never remembered.
    """

    def __init__(self, secret: str, max_tokens: int = 10_000, clock: Callable[[], float] = time.time):
        self.secret, self.max_tokens, self.clock = secret, max_tokens, clock
        self._verified: dict[str, Identity] = {}
        # Set at start-up: whether a sign-out ended the token's session (services/shared/sessions.py).
        self.revoked: Callable[[Identity], bool] | None = None

    def read(self, token: str) -> Identity:
        who = self._verified.get(token)
        if who is not None:
            if self.clock() >= who.expires_at:
                del self._verified[token]
                raise AuthError("the token has expired; sign in again")
        else:
            who = read_token(self.secret, token)  # raises AuthError
            if who.expires_at > self.clock():
                if len(self._verified) >= self.max_tokens:
                    self._verified.clear()
                self._verified[token] = who
        if self.revoked is not None and self.revoked(who):
            raise AuthError("this session was signed out; sign in again")
        return who
