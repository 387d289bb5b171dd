"""The user's own key, held for the session only.

The client keeps just ciphertext that only this server can open: AES-GCM under a server secret, with
the user id and sign-in session id as associated data (a cookie copied to another user or another
session does not open) and an expiry inside the sealed payload (an old copy stops working). The
cookie is HttpOnly, Secure and SameSite=Strict. Nothing else stores the key: not PostgreSQL, not
events, not logs, not responses (only its hint).
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from schemas.events import Provider

KEY_COOKIE = "byok_key"
_VERSION = b"\x01"
_NONCE = 12


@dataclass(frozen=True)
class SessionKey:
    provider: Provider
    # Kept out of repr so an accidental log or traceback of this object shows no key.
    api_key: str = field(repr=False)
    hint: str
    expires_at: int


def derive_secret(secret: str, label: bytes) -> bytes:
    """A 256-bit key for one purpose, derived from a configured secret (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret.encode())


class KeySealer:
    """Seals a key into a cookie value bound to (user, session) and opens it again."""

    def __init__(self, secret: bytes, ttl_s: int):
        self._aead = AESGCM(secret)
        self.ttl_s = ttl_s

    @staticmethod
    def _bound_to(user_id: str, session_id: str) -> bytes:
        return b"byok-key\x00" + user_id.encode() + b"\x00" + session_id.encode()

    def seal(self, user_id: str, session_id: str, provider: Provider, api_key: str, hint: str) -> str:
        payload = json.dumps(
            {"p": provider.value, "k": api_key, "h": hint, "exp": int(time.time()) + self.ttl_s}
        ).encode()
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, payload, self._bound_to(user_id, session_id))
        return base64.urlsafe_b64encode(_VERSION + nonce + sealed).decode().rstrip("=")

    def open(self, user_id: str, session_id: str, value: str | None) -> SessionKey | None:
        """The key sealed in `value` for this user and session, or None (absent, foreign, expired, forged)."""
        if not value or len(value) > 8192:
            return None
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            if raw[:1] != _VERSION:
                return None
            payload = self._aead.decrypt(raw[1:1 + _NONCE], raw[1 + _NONCE:], self._bound_to(user_id, session_id))
            data = json.loads(payload)
            key = SessionKey(Provider(data["p"]), data["k"], data["h"], int(data["exp"]))
        except (InvalidTag, ValueError, KeyError, TypeError):
            return None
        if key.expires_at <= time.time():
            return None
        return key
