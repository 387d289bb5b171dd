"""Identity from a signed token (JWT HS256): `sub` is the user, `role=admin` for admin routes.

Shared by every HTTP service, so a token minted by one (the chat's sign-in, `byok-token`) is read the
same way by the others. Identity never comes from a request body.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jwt
from pydantic import TypeAdapter, ValidationError

from schemas.events import Identifier

ALGORITHM = "HS256"
# A user id goes into the database, events and URLs: printable, 1 to 200 characters.
_USER_ID = TypeAdapter(Identifier)


class AuthError(Exception):
    """No token, or a token that is forged, expired or malformed."""


@dataclass(frozen=True)
class Identity:
    user_id: str
    role: str = "user"
    # Identifies one sign-in; the chat binds a sealed key to it, so the key dies with the session.
    session_id: str = ""
    token: str = ""
    # When the token stops being valid (its `exp`, Unix seconds); 0 = not known.
    expires_at: float = field(default=0.0, compare=False)
    # When it was issued (`iat`) and when its sign-in began (`sst`, kept across renewals); 0 = not known.
    issued_at: float = field(default=0.0, compare=False)
    session_started: float = field(default=0.0, compare=False)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_act_for(self, user_id: str) -> bool:
        return self.is_admin or self.user_id == user_id


def mint_token(
    secret: str,
    user_id: str,
    role: str = "user",
    ttl_s: int = 3600,
    session_id: str | None = None,
    session_started: float | None = None,
) -> str:
    """A signed token for `user_id` (used by the dev sign-in, `byok-token`, the demo and tests); a renewal
    passes the sign-in's `session_id` and `session_started` on."""
    if not user_id or len(user_id) > 200:
        raise ValueError("a user id has 1 to 200 characters")
    now = int(time.time())
    claims = {
        "sub": user_id,
        "role": role,
        "iat": now,
        "exp": now + ttl_s,
        "sid": session_id or secrets.token_urlsafe(12),
        "sst": int(session_started if session_started is not None else now),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def read_token(secret: str, token: str) -> Identity:
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("the token has expired; sign in again") from None
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    try:
        sub = _USER_ID.validate_python(claims.get("sub"), strict=True)
    except ValidationError:
        raise AuthError("invalid token: bad subject (a user id is 1 to 200 printable characters)") from None
    role, sid, exp, iat = claims.get("role"), claims.get("sid"), claims.get("exp"), claims.get("iat")
    if not isinstance(role, str):
        role = "user"
    if not isinstance(sid, str):
        # Tokens minted elsewhere may lack a session id; bind their keys to the token's issue time instead.
        sid = f"iat:{claims.get('iat', '')}"
    issued = float(iat) if isinstance(iat, (int, float)) else 0.0
    started = claims.get("sst")
    return Identity(
        sub,
        role,
        sid,
        token,
        float(exp) if isinstance(exp, (int, float)) else 0.0,
        issued,
        float(started) if isinstance(started, (int, float)) else issued,
    )


class TokenReader:
    """`read_token` that remembers the tokens it has verified, until each one's expiry.

    A client sends the same token with every request; checking its signature each time is a fifth
    of the work of a chat call's own route, and 15 % of the credit service's answer to a hold (py-spy).
    A remembered token is still refused once expired, and a token never verified (forged, malformed)
    is never remembered.
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
