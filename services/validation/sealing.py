"""Sealing a user's key for the request topic (PyNaCl sealed boxes: X25519 + XSalsa20-Poly1305).

The chat service seals with `KeySealer` to the worker's current public key; only the worker, holding
the private key (`KeyOpener`), can open it, so Kafka's log on disk holds only ciphertext. Every sealed
key names the key id it was sealed to, and the opener holds several private keys at once, so keys
rotate without a lost request.

`python -m services.validation.sealing generate [KEY_ID]` prints a new key pair as env settings.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from nacl.encoding import Base64Encoder
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from services.validation.settings import SealingSettings


class SealingError(Exception):
    """A sealed key could not be opened (unknown key id, tampered or not ours)."""


@dataclass(frozen=True)
class SealedKey:
    key_id: str
    sealed_key: str  # base64 of the sealed box


class KeySealer:
    """Seals keys to the worker's current public key (chat side)."""

    def __init__(self, public_keys: Mapping[str, str], current_key_id: str):
        if current_key_id not in public_keys:
            raise ValueError(f"no public key with id {current_key_id!r}")
        self.key_id = current_key_id
        self._box = SealedBox(PublicKey(public_keys[current_key_id].encode(), encoder=Base64Encoder))

    @classmethod
    def from_settings(cls, settings: SealingSettings | None = None) -> KeySealer:
        settings = settings or SealingSettings()
        return cls(settings.public_keys, settings.current_key_id)

    def seal(self, api_key: str) -> SealedKey:
        return SealedKey(self.key_id, base64.b64encode(self._box.encrypt(api_key.encode())).decode())


class KeyOpener:
    """Opens sealed keys with any of the worker's private keys (worker side)."""

    def __init__(self, private_keys: Mapping[str, str]):
        if not private_keys:
            raise ValueError("the worker needs at least one private key")
        self._boxes = {
            key_id: SealedBox(PrivateKey(secret.encode(), encoder=Base64Encoder))
            for key_id, secret in private_keys.items()
        }

    @classmethod
    def from_settings(cls, settings: SealingSettings | None = None) -> KeyOpener:
        settings = settings or SealingSettings()
        return cls({k: v.get_secret_value() for k, v in settings.private_keys.items()})

    @property
    def key_ids(self) -> list[str]:
        return list(self._boxes)

    def open(self, key_id: str, sealed_key: str) -> str:
        box = self._boxes.get(key_id)
        if box is None:
            raise SealingError(f"no private key with id {key_id!r} (known: {', '.join(self._boxes)})")
        try:
            return box.decrypt(base64.b64decode(sealed_key, validate=True)).decode()
        except (CryptoError, binascii.Error, ValueError):
            raise SealingError(f"the sealed key does not open with key {key_id!r}") from None


def generate(key_id: str) -> dict[str, str]:
    """A new key pair as the env settings of the worker and of the chat service."""
    private = PrivateKey.generate()
    return {
        "KEY_SEAL_CURRENT_KEY_ID": key_id,
        "KEY_SEAL_PUBLIC_KEYS": json.dumps({key_id: private.public_key.encode(Base64Encoder).decode()}),
        "KEY_SEAL_PRIVATE_KEYS": json.dumps({key_id: private.encode(Base64Encoder).decode()}),
    }


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "generate":
        print("usage: python -m services.validation.sealing generate [KEY_ID]", file=sys.stderr)
        sys.exit(2)
    from datetime import date

    for name, value in generate(sys.argv[2] if len(sys.argv) > 2 else f"k{date.today():%Y%m%d}").items():
        print(f"{name}='{value}'")
