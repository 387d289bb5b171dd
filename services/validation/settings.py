"""The key-check worker's own settings (the sealing keys it shares with the chat service are
`services.shared.sealing.SealingSettings`)."""

from __future__ import annotations

from pydantic import Field

from providers import ProviderSettings
from services.shared.settings import CommonSettings


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
    fetch_max_wait_ms: int = 100  # how often a quiet worker asks; see services/credits/settings.py
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
