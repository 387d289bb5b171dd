"""The chat service's rules: which key a call runs on, when it is refused, what it is billed.

Entry points (HTTP routes) translate requests into calls of `ChatService`; adapters (PostgreSQL,
the key checker) are reached through the ports passed in, so unit tests run these rules with fakes.
The call itself (idempotency, holds, the provider, how it ends) is `services/chat/calls.py`'s.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import providers
from billing.pricing import PriceBook
from providers import key_hint, normalize_key
from schemas.events import (
    MODEL_ID_PATTERN,
    Feature,
    KeyCheckResult,
    KeyCheckStatus,
    KeySource,
    Provider,
    utc_now,
)
from services.chat.call_request import CallRequest
from services.chat.identity import Identity
from services.chat.key_session import KeyRing, SessionKey
from services.chat.refusals import (
    InvalidRequest,
    PlatformKeyMissing,
    SettingsChanged,
)
from services.chat.routing import LiveKey, Route, Router, session_of
from services.chat.store import (
    REVOKED_BYOK_OFF,
    REVOKED_REMOVED,
    REVOKED_SIGN_OUT,
    KeyRecord,
    ModelSettings,
    SettingsStore,
)

log = logging.getLogger(__name__)


class KeyCheckClient(Protocol):
    """Port: checks a key with its provider (the validation worker, over Kafka request/reply)."""

    async def check(self, user_id: str, provider: Provider, api_key: str, timeout_s: float) -> KeyCheckResult: ...


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingsChange:
    accepted: bool
    settings: ModelSettings
    check: KeyCheckResult | None = None
    # A checked key to add to the session's ring (sealed into the cookie by the edge); never shown.
    keep_key: SessionKey | None = field(default=None, repr=False)
    # Every key of the session is gone (revoked on the server): the edge drops the cookie.
    discard_key: bool = False
    message: str = ""


@dataclass(frozen=True)
class SettingsView:
    settings: ModelSettings
    keys: dict[Provider, LiveKey]
    routes: dict[Feature, Route]
    platform_price: int | None
    key_lifetime_s: int

    def as_dict(self) -> dict[str, Any]:
        s = self.settings
        held = self.keys.get(s.provider)
        if not s.use_own_key:
            status = message = None
        elif held is None:
            status, message = "missing", self.routes[Feature.CHAT].as_dict()["message"]
        else:
            status, message = held.record.status, held.record.message
        return {
            "user_id": s.user_id,
            "provider": s.provider.value,
            "model": s.model,
            "byok": s.use_own_key,
            "use_own_key": s.use_own_key,
            "fallback_to_platform": s.fallback_to_platform,
            # The selected provider's key (the contract's fields); `keys` lists every provider's.
            "key_hint": held.record.hint if s.use_own_key and held else None,
            "key_status": status,
            "key_message": message,
            "key_in_session": bool(s.use_own_key and held and held.usable),
            "keys": [k.as_dict() for k in self.keys.values()],
            "key_lifetime_s": self.key_lifetime_s,
            "mode": "byok" if s.use_own_key else "platform",
            "platform_price": self.platform_price,
            "features": {f.value: r.as_dict() for f, r in self.routes.items()},
        }


def settings_changed(route: Route) -> SettingsChanged:
    """The refusal of a call the page showed on another route than the one it would take now."""
    if route.key_source is KeySource.BYOK:
        now = f"{route.model} on your {providers.of(route.provider).name} key, no credits"
    else:
        now = f"{route.model} on platform credits, {route.credits} credits"
    return SettingsChanged(
        f"Your model settings changed since this page showed them (in another tab?): this message would now "
        f"run on {now}. Nothing was sent or charged. Check the settings above and send it again.",
        reason="settings_changed",
        route=route.as_dict(),
    )


class ChatService:
    def __init__(
        self,
        *,
        store: SettingsStore,
        checker: KeyCheckClient,
        platform_keys: Mapping[Provider, str | None],
        price_book: PriceBook,
        default_provider: Provider = Provider.OPENAI,
        default_model: str = "gpt-4o-mini",
        feature_models: Mapping[Feature, tuple[Provider, str]] | None = None,
        key_ttl_s: int = 8 * 3600,
        key_check_timeout_s: float = 15.0,
        clock: Callable[[], datetime] = utc_now,
    ):
        self.store, self.checker, self.platform_keys, self.book = store, checker, dict(platform_keys), price_book
        self.default_provider, self.default_model = default_provider, default_model
        self.router = Router(price_book, default_provider=default_provider, feature_models=feature_models, clock=clock)
        self.key_ttl_s, self.key_check_timeout_s, self.clock = key_ttl_s, key_check_timeout_s, clock

    # --- settings and keys ------------------------------------------------------------------------

    def _default(self, user_id: str) -> ModelSettings:
        return ModelSettings(user_id, self.default_provider, self.default_model)

    async def state(self, who: Identity, ring: KeyRing | None) -> tuple[ModelSettings, dict[Provider, LiveKey]]:
        """The user's settings and the keys of `ring` the server still honours, in one read."""
        ring = ring or {}
        settings, records = await self.store.load(who.user_id, session_of(who), [k.key_id for k in ring.values()])
        held = {}
        for provider, key in ring.items():
            record = records.get(provider)
            # Bound to its provider: a record of another provider (or none) makes the entry useless.
            if record is not None and record.key_id == key.key_id and record.provider is key.provider:
                held[provider] = LiveKey(key, record)
        return settings or self._default(who.user_id), held

    async def view(self, who: Identity, ring: KeyRing | None) -> SettingsView:
        s, held = await self.state(who, ring)
        return self._view(s, held)

    def _view(self, s: ModelSettings, held: Mapping[Provider, LiveKey]) -> SettingsView:
        routes = {f: self.router.route(s, held, f) for f in Feature}
        price = self.book.in_force(self.clock()).model_price(s.model)
        return SettingsView(s, dict(held), routes, price, self.key_ttl_s)

    async def update_settings(
        self,
        who: Identity,
        ring: KeyRing | None,
        provider: Provider,
        model: str,
        use_own_key: bool,
        api_key: str | None,
        fallback_to_platform: bool | None = None,
    ) -> SettingsChange:
        """Apply new settings; a supplied key is checked first and a refused key changes nothing."""
        model = model.strip()
        if not model:
            raise InvalidRequest("Choose a model.")
        if not re.fullmatch(MODEL_ID_PATTERN, model):
            raise InvalidRequest(
                "A model id is 1 to 100 letters, digits, '.', '_', ':' or '-'. Choose a model from the list.",
                reason="invalid_model",
            )
        current, held = await self.state(who, ring)
        fallback = current.fallback_to_platform if fallback_to_platform is None else fallback_to_platform
        new = ModelSettings(who.user_id, provider, model, use_own_key, fallback)
        name = providers.of(provider).name
        if not use_own_key:
            await self.store.put(new)
            # Every key of the user goes, on the server too: a saved copy of the cookie opens nothing.
            revoked = await self.store.revoke_keys(who.user_id, REVOKED_BYOK_OFF)
            gone = ", ".join(f"{providers.of(p).name} {k.record.hint}" for p, k in held.items())
            return SettingsChange(
                True,
                new,
                discard_key=True,
                message=(
                    f"Your keys ({gone}) were removed from this session. "
                    if gone
                    else "Your earlier keys were removed. "
                    if revoked
                    else ""
                )
                + "Calls now run on platform credits.",
            )
        if api_key is not None and normalize_key(api_key):
            api_key = normalize_key(api_key)
            result = await self._check(who, provider, api_key)
            if result.status is not KeyCheckStatus.VALID:
                earlier = held.get(provider)
                keep = (
                    f" Your earlier {name} key {earlier.record.hint} is still the one in use."
                    if earlier and earlier.usable
                    else ""
                )
                return SettingsChange(False, current, result, message=result.message + keep)
            hint = result.key_hint or key_hint(api_key) or ""
            key = SessionKey(uuid.uuid4(), provider, api_key, hint, int(time.time()) + self.key_ttl_s)
            expires = datetime.fromtimestamp(key.expires_at, tz=timezone.utc)
            await self.store.add_key(
                who.user_id,
                session_of(who),
                KeyRecord(key.key_id, provider, hint, result.status.value, result.message, expires),
            )
            await self.store.put(new)
            return SettingsChange(
                True,
                new,
                result,
                keep_key=key,
                message=f"Chat now runs on your {name} key: no credits are used for chat.",
            )
        await self.store.put(new)
        message = self._view(new, held).routes[Feature.CHAT].as_dict()["message"]
        return SettingsChange(True, new, message=message)

    async def remove_key(self, who: Identity, provider: Provider) -> int:
        """Remove the session's key of `provider` (revoked on the server); how many were removed."""
        return await self.store.revoke_keys(who.user_id, REVOKED_REMOVED, session_id=session_of(who), provider=provider)

    async def sign_out(self, who: Identity, everywhere: bool = False) -> int:
        """Revoke every key of this sign-in session (of every session of the user, `everywhere`)."""
        return await self.store.revoke_keys(
            who.user_id, REVOKED_SIGN_OUT, session_id=None if everywhere else session_of(who)
        )

    async def _check(self, who: Identity, provider: Provider, api_key: str) -> KeyCheckResult:
        try:
            return await self.checker.check(who.user_id, provider, api_key, self.key_check_timeout_s)
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.warning("key check for %s could not complete: %s", who.user_id, type(exc).__name__)
            return KeyCheckResult(
                request_id=uuid.uuid4(),
                provider=provider,
                status=KeyCheckStatus.PROVIDER_UNAVAILABLE,
                message="We could not check your key just now (the key checker did not answer). "
                "The key may well be fine: try again in a minute.",
                key_hint=key_hint(api_key),
            )

    # --- calls ------------------------------------------------------------------------------------

    async def plan(self, who: Identity, ring: KeyRing | None, request: CallRequest) -> tuple[Route, str]:
        """Where a call runs and the key it runs on, or the refusal (`ChatRefused`) that stops it before
        anything is written, held or asked. The call itself is `ChatCalls`'."""
        held: Mapping[Provider, LiveKey]
        if self.router.needs_state(request.feature, request.model, request.own_key):
            s, held = await self.state(who, ring)
        else:  # nothing to read: one round trip fewer a call
            s, held = self._default(who.user_id), {}
        if request.model is None:
            route = self.router.route(s, held, request.feature)
        else:
            route = self.router.route_for_model(s, held, request.feature, request.model, request.own_key)
        if route.refusal is not None:
            raise route.refusal
        if request.shown is not None and request.shown != (route.key_source.value, route.model, route.credits):
            raise settings_changed(route)
        if route.key_source is KeySource.BYOK:
            api_key = route.key.key.api_key if route.key is not None else providers.normalize_key(request.own_key or "")
        else:
            api_key = self.platform_keys.get(route.provider) or ""
            if not api_key:
                raise PlatformKeyMissing(
                    f"The platform has no {providers.of(route.provider).name} key configured. "
                    "Use your own key for chat, or choose another provider."
                )
        self.router.refuse_unrunnable(route.model, route.key_source)
        return route, api_key
