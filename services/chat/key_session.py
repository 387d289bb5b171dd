"""The user's own keys, held for the session only: at most one per provider.

The client keeps just ciphertext that only this server can open: AES-GCM under a server secret, with
the user id and sign-in session id as associated data (a cookie copied to another user or another
session does not open) and each key's expiry inside the sealed payload (an old copy stops working).
The cookie is HttpOnly, Secure and SameSite=Strict.

Each sealed key carries a random key id. The server keeps that id (never the key) with the key's
provider, hint and status (`chat_session_keys`); a key whose id the server has revoked or forgotten
is never used, so sign-out, switching BYOK off, removing or replacing a key makes every copy of the
old cookie useless, not only the browser's.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from schemas.events import Provider

KEY_COOKIE = "byok_key"
_VERSION = b"\x02"  # a ring of keys, one per provider (v1 held one key and had no key id)
_NONCE = 12
MAX_COOKIE_CHARS = 8192


@dataclass(frozen=True)
class SessionKey:
    """One provider's key as the cookie holds it: the key itself, its server-side id and expiry."""

    key_id: uuid.UUID
    provider: Provider
    # Kept out of repr so an accidental log or traceback of this object shows no key.
    api_key: str = field(repr=False)
    hint: str
    expires_at: int


KeyRing = Mapping[Provider, SessionKey]
"""The keys a request's cookie holds, by provider (each entry's provider is its own)."""


def derive_secret(secret: str, label: bytes) -> bytes:
    """A 256-bit key for one purpose, derived from a configured secret (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret.encode())


class KeyCookie:
    """Seals a ring of keys into a cookie value bound to (user, session) and opens it again."""

    def __init__(self, secret: bytes, ttl_s: int, clock: Callable[[], float] = time.time):
        self._aead = AESGCM(secret)
        self.ttl_s, self.clock = ttl_s, clock

    @staticmethod
    def _bound_to(user_id: str, session_id: str) -> bytes:
        return b"byok-key-ring\x00" + user_id.encode() + b"\x00" + session_id.encode()

    def seal(self, user_id: str, session_id: str, ring: KeyRing) -> str:
        payload = json.dumps(
            [
                {"id": str(k.key_id), "p": k.provider.value, "k": k.api_key, "h": k.hint, "exp": k.expires_at}
                for k in ring.values()
            ]
        ).encode()
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, payload, self._bound_to(user_id, session_id))
        return base64.urlsafe_b64encode(_VERSION + nonce + sealed).decode().rstrip("=")

    def max_age_s(self, ring: KeyRing) -> int:
        """How long the cookie should live: until its last key expires."""
        return max(0, max((k.expires_at for k in ring.values()), default=0) - int(self.clock()))

    def open(self, user_id: str, session_id: str, value: str | None) -> dict[Provider, SessionKey]:
        """The unexpired keys sealed in `value` for this user and session ({} if absent, foreign or forged)."""
        if not value or len(value) > MAX_COOKIE_CHARS:
            return {}
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            if raw[:1] != _VERSION:
                return {}
            payload = self._aead.decrypt(raw[1 : 1 + _NONCE], raw[1 + _NONCE :], self._bound_to(user_id, session_id))
            entries = json.loads(payload)
            keys = [SessionKey(uuid.UUID(e["id"]), Provider(e["p"]), e["k"], e["h"], int(e["exp"])) for e in entries]
        except (InvalidTag, ValueError, KeyError, TypeError):
            return {}
        now = self.clock()
        return {k.provider: k for k in keys if k.expires_at > now}
