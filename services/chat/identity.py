"""Who is calling: a signed token (JWT HS256; `sub` = user id, `role` = "admin" for admin routes).

The token comes from an `Authorization: Bearer` header (API clients) or from the HttpOnly session
cookie set by the dev sign-in (the page). Identity never comes from a request body.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
SESSION_COOKIE = "byok_session"


class NotAuthenticated(Exception):
    """No token, or a token that is forged, expired or malformed."""


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: str = "user"
    # Identifies one sign-in; the sealed key is bound to it, so it dies with the session.
    session_id: str = ""
    token: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def issue_token(secret: str, user_id: str, role: str = "user", ttl_s: int = 3600, session_id: str | None = None) -> str:
    """A signed token for `user_id`; used by the dev sign-in and the `byok-token` command."""
    if not user_id or len(user_id) > 200:
        raise ValueError("a user id has 1 to 200 characters")
    now = int(time.time())
    claims = {"sub": user_id, "role": role, "iat": now, "exp": now + ttl_s, "sid": session_id or secrets.token_urlsafe(12)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def read_token(secret: str, token: str) -> Principal:
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.PyJWTError as exc:
        raise NotAuthenticated(f"invalid token: {exc}") from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 200:
        raise NotAuthenticated("invalid token: bad subject")
    role = claims.get("role") if isinstance(claims.get("role"), str) else "user"
    # Tokens minted elsewhere may lack a session id; bind their keys to the token's issue time instead.
    sid = claims.get("sid") if isinstance(claims.get("sid"), str) else f"iat:{claims.get('iat', '')}"
    return Principal(sub, role, sid, token)


def token_from(authorization: str | None, cookie: str | None) -> str:
    """The bearer token if one is sent, else the session cookie's."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise NotAuthenticated("use 'Authorization: Bearer <token>'")
        return value.strip()
    if cookie:
        return cookie
    raise NotAuthenticated("sign in first")
