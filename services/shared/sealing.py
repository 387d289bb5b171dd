"""Sealing a user's key for the request topic (PyNaCl sealed boxes: X25519 + XSalsa20-Poly1305).

The chat service seals with `KeySealer` to the worker's current public key; only the worker, holding
the private key (`KeyOpener`), can open it, so Kafka's log on disk holds only ciphertext. Every sealed
key names the key id it was sealed to, and the opener holds several private keys at once, so keys
rotate without a lost request.

`python -m services.shared.sealing generate [KEY_ID]` prints a new key pair as env settings.
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
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# ---------------------------------------------------------------------------------------------
# DEV ONLY, INSECURE: this key pair is public (it is in the repository), so anything sealed to it
# can be opened by anyone who reads this file. It exists so `make run` works on a fresh machine.
# Production sets KEY_SEAL_PUBLIC_KEYS / KEY_SEAL_PRIVATE_KEYS / KEY_SEAL_CURRENT_KEY_ID; make a
# pair with `python -m services.shared.sealing generate`.
DEV_KEY_ID = "dev-insecure-1"
DEV_PUBLIC_KEY = "rMFoNE/duHUspeKxqUruwyhZeb4xJowz12wg4/6Y1hA="
DEV_PRIVATE_KEY = "qarMwBlrCQIZ3y7rB+zqU3hwm1bOTRqZCxuajQu4unw="
# ---------------------------------------------------------------------------------------------


class SealingSettings(BaseSettings):
    """Which worker public key seals a user's key on the request topic.

    Env: `KEY_SEAL_CURRENT_KEY_ID` (the id the chat service seals with), `KEY_SEAL_PUBLIC_KEYS`
    (JSON `{"key id": "base64 public key"}`, chat side), `KEY_SEAL_PRIVATE_KEYS` (JSON
    `{"key id": "base64 private key"}`, worker side only). To rotate: give the worker both private
    keys, add the new public key, switch `KEY_SEAL_CURRENT_KEY_ID`, and drop the old pair once no
    request sealed to it can still be in flight (the request topic keeps one hour).
    """

    model_config = SettingsConfigDict(env_file=None, extra="ignore", env_prefix="KEY_SEAL_")

    current_key_id: str = DEV_KEY_ID
    public_keys: dict[str, str] = Field(default_factory=lambda: {DEV_KEY_ID: DEV_PUBLIC_KEY})
    private_keys: dict[str, SecretStr] = Field(default_factory=lambda: {DEV_KEY_ID: SecretStr(DEV_PRIVATE_KEY)})

    @model_validator(mode="after")
    def _current_key_is_known(self) -> SealingSettings:
        if self.public_keys and self.current_key_id not in self.public_keys:
            raise ValueError(f"KEY_SEAL_CURRENT_KEY_ID {self.current_key_id!r} is not in KEY_SEAL_PUBLIC_KEYS")
        return self

    @property
    def uses_dev_key(self) -> bool:
        return DEV_KEY_ID in self.private_keys or self.current_key_id == DEV_KEY_ID


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
        print("usage: python -m services.shared.sealing generate [KEY_ID]", file=sys.stderr)
        sys.exit(2)
    from datetime import date

    for name, value in generate(sys.argv[2] if len(sys.argv) > 2 else f"k{date.today():%Y%m%d}").items():
        print(f"{name}='{value}'")
