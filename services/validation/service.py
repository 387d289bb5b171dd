"""The key-check use case: shape, cache, per-user limit, then the provider (no Kafka here)."""

from __future__ import annotations

import logging
from typing import Protocol

import providers
from providers import KeyVerdict
from schemas.events import Provider
from services.validation import metrics
from services.validation.guards import UserRateLimit, VerdictCache, too_many_checks

log = logging.getLogger(__name__)


class Checker(Protocol):
    async def check(self, provider: Provider, api_key: str) -> KeyVerdict: ...


class KeyCheckService:
    """Answers "does this key work?" for one user, calling the provider only when it must."""

    def __init__(self, checker: Checker, cache: VerdictCache, limit: UserRateLimit):
        self.checker, self.cache, self.limit = checker, cache, limit

    async def check(self, user_id: str, provider: Provider, api_key: str) -> KeyVerdict:
        api_key = providers.normalize_key(api_key)
        if problem := providers.key_shape_problem(provider, api_key):
            return self._count(provider, providers.malformed(provider, problem), "local")
        fingerprint = self.cache.fingerprint(provider, api_key)
        if (cached := self.cache.get(fingerprint)) is not None:
            return self._count(provider, cached, "cache")
        if (wait_s := self.limit.acquire(user_id, provider)) is not None:
            return self._count(provider, too_many_checks(wait_s, provider, self.limit.per_minute), "user_limit")
        verdict = await self.checker.check(provider, api_key)
        self.cache.put(fingerprint, verdict)
        return self._count(provider, verdict, "provider")

    @staticmethod
    def _count(provider: Provider, verdict: KeyVerdict, source: str) -> KeyVerdict:
        metrics.CHECKS.labels(provider.value, verdict.status.value, source).inc()
        return verdict
