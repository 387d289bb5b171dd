"""Identity from a signed token (JWT HS256): `sub` is the user, `role=admin` for admin routes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import jwt

ALGORITHM = "HS256"


class AuthError(Exception):
    pass


@dataclass(frozen=True)
class Identity:
    user_id: str
    role: str = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_act_for(self, user_id: str) -> bool:
        return self.is_admin or self.user_id == user_id


def mint_token(secret: str, user_id: str, role: str = "user", ttl: timedelta = timedelta(hours=12)) -> str:
    now = datetime.now(timezone.utc)
    return jwt.encode({"sub": user_id, "role": role, "iat": now, "exp": now + ttl}, secret, algorithm=ALGORITHM)


def read_token(secret: str, token: str) -> Identity:
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("the token has expired; sign in again") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError("the token is not valid") from exc
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("the token names no user")
    return Identity(sub, claims.get("role", "user"))
