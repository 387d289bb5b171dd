"""The two guards in front of the provider: a short-lived result cache and a per-user limit."""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import providers
from providers import KeyVerdict
from schemas.events import KeyCheckStatus, Provider

# Answers about the key itself; "rate limited" and "unavailable" say nothing lasting about it.
CACHEABLE = frozenset(
    {
        KeyCheckStatus.VALID,
        KeyCheckStatus.INVALID,
        KeyCheckStatus.REVOKED_OR_EXPIRED,
        KeyCheckStatus.PERMISSION_DENIED,
        KeyCheckStatus.QUOTA_EXHAUSTED,
    }
)


class VerdictCache:
    """Verdicts by HMAC fingerprint of (provider, key), never by the key itself.

    The HMAC secret is random per process: the cache lives in memory only, so nothing needs to be
    shared, and a fingerprint is worthless outside this process.
    """

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._secret = os.urandom(32)
        self._entries: OrderedDict[bytes, tuple[float, KeyVerdict]] = OrderedDict()

    def fingerprint(self, provider: Provider, api_key: str) -> bytes:
        return hmac.new(self._secret, f"{provider.value}\0{api_key}".encode(), hashlib.sha256).digest()

    def get(self, fingerprint: bytes) -> KeyVerdict | None:
        entry = self._entries.get(fingerprint)
        if entry is None:
            return None
        expires, verdict = entry
        if self._clock() >= expires:
            del self._entries[fingerprint]
            return None
        return verdict

    def put(self, fingerprint: bytes, verdict: KeyVerdict) -> None:
        if verdict.status not in CACHEABLE or self.ttl_s <= 0:
            return
        self._entries[fingerprint] = (self._clock() + self.ttl_s, verdict)
        self._entries.move_to_end(fingerprint)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class UserRateLimit:
    """At most `per_minute` provider calls per user and provider in any sliding minute.

    Counted per provider: checking many OpenAI keys says nothing about the next Groq key, and the
    limit protects each provider's quota separately, so a user is never told to wait for a provider
    they have not used. Kept in memory: requests are keyed by user id, so one user's requests all
    land on one partition and so on one worker.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic, max_users: int = 100_000):
        self.per_minute, self._clock, self.max_users = per_minute, clock, max_users
        self._calls: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def acquire(self, user_id: str, provider: Provider | str = "") -> float | None:
        """Take one call for `user_id` at `provider`: None if allowed, else the seconds until one is free."""
        now = self._clock()
        slot = (user_id, str(provider))
        calls = self._calls.setdefault(slot, deque())
        self._calls.move_to_end(slot)
        while calls and calls[0] <= now - 60:
            calls.popleft()
        if len(calls) >= self.per_minute:
            return max(0.0, calls[0] + 60 - now)
        calls.append(now)
        while len(self._calls) > self.max_users:
            self._calls.popitem(last=False)
        return None


def too_many_checks(wait_s: float, provider: Provider | None = None, per_minute: int | None = None) -> KeyVerdict:
    """The answer once a user reached the check limit for one provider: which provider, how long."""
    seconds = max(1, math.ceil(wait_s))
    if provider is None:
        return KeyVerdict(
            KeyCheckStatus.RATE_LIMITED,
            f"You have checked several keys in the last minute. Wait about {seconds} seconds and try again.",
            wait_s,
        )
    name = providers.of(provider).name
    many = f"{per_minute} {name} keys" if per_minute else f"several {name} keys"
    return KeyVerdict(
        KeyCheckStatus.RATE_LIMITED,
        f"You have checked {many} in the last minute, the most we ask {name} about per minute. Wait about "
        f"{seconds} seconds before checking another {name} key; keys of other providers can be checked now.",
        wait_s,
    )
