"""Who is calling: a signed token (JWT HS256; `sub` = user id, `role` = "admin" for admin routes).

The token comes from an `Authorization: Bearer` header (API clients) or from the HttpOnly session
cookie set by the dev sign-in (the page). Identity never comes from a request body.
"""

from __future__ import annotations

from services.shared.auth import AuthError, Identity, TokenReader, mint_token, read_token

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
