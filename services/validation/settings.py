"""Settings of the key-check system: sealing keys (shared with the chat service) and the worker's own."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.providers import ProviderSettings
from services.shared.settings import CommonSettings

# ---------------------------------------------------------------------------------------------
# DEV ONLY, INSECURE: this key pair is public (it is in the repository), so anything sealed to it
# can be opened by anyone who reads this file. It exists so `make run` works on a fresh machine.
# Production sets KEY_SEAL_PUBLIC_KEYS / KEY_SEAL_PRIVATE_KEYS / KEY_SEAL_CURRENT_KEY_ID; make a
# pair with `python -m services.validation.sealing generate`.
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


class ValidationSettings(CommonSettings, ProviderSettings):
    """The worker's settings (env), with local defaults."""

    consumer_group: str = "validation"
    http_host: str = "127.0.0.1"
    http_port: int = 8002
    # The provider call: short, and retried only once, on a fresh connection, when it failed before any
    # response byte (a stale pooled connection); never on a timeout or an error answer.
    check_timeout_s: float = 5.0
    check_connect_timeout_s: float = 2.0
    # Results of a key (by HMAC fingerprint) are reused this long, so a double click costs one call.
    cache_ttl_s: float = 60.0
    cache_max_entries: int = 10_000
    # Provider calls one user may cause per minute (cache hits and malformed keys do not count).
    user_checks_per_minute: int = Field(default=10, ge=1)
    # Checks running at once in one worker; more requests wait in Kafka.
    max_in_flight: int = Field(default=64, ge=1)
    fetch_max_wait_ms: int = 20
    # A dead worker's partitions move to a live one after this long (the broker's minimum is 6 s).
    session_timeout_ms: int = Field(default=10_000, ge=6_000)
    # Static group membership (KIP-345): a restarted worker gets its partitions back at once instead
    # of after a rebalance. The instance's name (VALIDATION_INSTANCE, e.g. validation-1 from the stack,
    # a container's hostname under Docker), or GROUP_INSTANCE_ID to set the id itself. Neither: dynamic.
    validation_instance: str | None = None
    group_instance_id: str | None = None
    # A request older than this is answered "try again" without calling the provider: its requester
    # gave up long ago, and a backlog after an outage must not become a burst on the providers.
    max_request_age_s: float = 120.0
    # Attempts to send one reply before the request is dead-lettered instead (each waits up to the
    # producer's 10 s request timeout); while the DLQ cannot be written either, it keeps trying.
    reply_attempts: int = Field(default=3, ge=1)

    @property
    def static_member_id(self) -> str | None:
        if self.group_instance_id:
            return self.group_instance_id
        return self.validation_instance or None
