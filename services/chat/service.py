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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Protocol

import providers
from billing.policy import platform_price
from billing.pricing import PriceBook
from providers import key_hint, normalize_key
from schemas.events import (
    MODEL_ID_PATTERN,
    Decision,
    Feature,
    KeyCheckResult,
    KeyCheckStatus,
    KeySource,
    Provider,
    utc_now,
)
from services.chat.call_request import CallRequest
from services.chat.catalog import MODELS
from services.chat.identity import Identity
from services.chat.key_session import KeyRing, SessionKey
from services.chat.refusals import (
    ChatRefused,
    InvalidRequest,
    ModelNotFound,
    OwnKeyMissing,
    PaymentRequired,
    PlatformKeyMissing,
)
from services.chat.store import (
    REVOKED_BYOK_OFF,
    REVOKED_REMOVED,
    REVOKED_SIGN_OUT,
    KeyRecord,
    ModelSettings,
    SettingsStore,
)

log = logging.getLogger(__name__)

FEATURE_NAMES = {
    Feature.CHAT: "Chat",
    Feature.DEEP_ANALYSIS: "Deep analysis",
    Feature.CODE_FIX: "Code fix",
    Feature.CODE_CANVAS: "Code canvas",
}
# What each feature asks the model to do (the product's prompts are richer; these keep calls honest).
FEATURE_PROMPTS = {
    Feature.CHAT: "You are a helpful data-analysis assistant.",
    Feature.DEEP_ANALYSIS: "You are a data analyst. Analyse the request in depth, step by step.",
    Feature.CODE_FIX: "You fix Python data-analysis code. Answer with the corrected code.",
    Feature.CODE_CANVAS: "You write Python data-analysis code for a notebook canvas.",
}
MAX_MESSAGE_CHARS = 20_000
# The models the platform runs the always-platform features on (ChatSettings overrides them).
DEFAULT_FEATURE_MODELS: dict[Feature, tuple[Provider, str]] = {
    Feature.DEEP_ANALYSIS: (Provider.OPENAI, "gpt-4.1"),
    Feature.CODE_FIX: (Provider.OPENAI, "gpt-4.1-mini"),
    Feature.CODE_CANVAS: (Provider.OPENAI, "gpt-4.1-mini"),
}


def page_request(feature: Feature, message: str) -> CallRequest:
    """The page's message as a call: the feature's prompt, then the message."""
    if not message.strip():
        raise InvalidRequest("Type a message first.")
    if len(message) > MAX_MESSAGE_CHARS:
        raise InvalidRequest(
            f"Messages are limited to {MAX_MESSAGE_CHARS:,} characters and this one has {len(message):,}. "
            "Shorten it or send it in parts.",
            reason="message_too_long",
        )
    return CallRequest(
        feature, ({"role": "system", "content": FEATURE_PROMPTS[feature]}, {"role": "user", "content": message})
    )


def provider_for_model(model: str) -> Provider | None:
    """The provider of a model: the catalog's, else by its name (`gpt-…`, `claude…`, …)."""
    for provider, models in MODELS.items():
        if model in models:
            return provider
    return providers.provider_of_model(model)


def session_of(who: Identity) -> str:
    """The sign-in session a key is bound to (tokens without one share the "api" session)."""
    return who.session_id or "api"


class KeyChecker(Protocol):
    """Port: checks a key with its provider (the validation worker, over Kafka request/reply)."""

    async def check(self, user_id: str, provider: Provider, api_key: str, timeout_s: float) -> KeyCheckResult: ...


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Billing:
    """What a call costs the user, as the credit policy decides it for the call's own event."""

    key_source: KeySource
    decision: Decision
    credits: int
    price_list_version: str | None
    balance_before: int | None = None

    @property
    def charged(self) -> bool:
        return self.decision is Decision.DEBITED

    def as_dict(self) -> dict:
        summary = {
            Decision.DEBITED: f"Platform: {self.credits} credit{'s' if self.credits != 1 else ''} charged",
            Decision.NOT_BILLED_BYOK: "Your key: no credits",
            Decision.NOT_BILLED_FAILED: "Failed call: no credits",
            Decision.REJECTED: "Not billed",
        }[self.decision]
        return {
            "key_source": self.key_source.value,
            "decision": self.decision.value,
            "charged": self.charged,
            "credits": self.credits,
            "price_list_version": self.price_list_version,
            "balance_before": self.balance_before,
            "balance_after": None if self.balance_before is None else self.balance_before - self.credits,
            "summary": summary,
        }


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


# Statuses after which a key is of no use until it is replaced: a check or a call said so.
DEAD_KEY_STATUSES = frozenset(
    {
        KeyCheckStatus.INVALID.value,
        KeyCheckStatus.REVOKED_OR_EXPIRED.value,
        KeyCheckStatus.PERMISSION_DENIED.value,
        KeyCheckStatus.QUOTA_EXHAUSTED.value,
        KeyCheckStatus.MALFORMED.value,
    }
)


@dataclass(frozen=True)
class HeldKey:
    """A key the session's cookie holds and the server still honours (live, not revoked)."""

    key: SessionKey
    record: KeyRecord

    @property
    def usable(self) -> bool:
        return self.record.status not in DEAD_KEY_STATUSES

    def as_dict(self) -> dict:
        r = self.record
        return {
            "provider": r.provider.value,
            "name": providers.of(r.provider).name,
            "key_hint": r.hint,
            "key_status": r.status,
            "key_message": r.message,
            "usable": self.usable,
            "expires_at": r.expires_at.isoformat(),
        }


@dataclass(frozen=True)
class Route:
    """Where one call of a feature runs and what it costs, decided before anything is spent.

    The page's status line and `call` both come from `ChatService.route`, so what the page says a
    feature will do is what the call does.
    """

    feature: Feature
    key_source: KeySource
    provider: Provider
    model: str
    credits: int | None  # the price on platform credits; 0 on the user's key; None = no platform price
    held: HeldKey | None = None  # the user's key it runs on (BYOK chat only)
    fallback: bool = False  # BYOK chat on platform credits because the user chose to fall back
    refusal: ChatRefused | None = None  # why it will not run at all
    note: str = ""
    reason: str = ""  # why a BYOK chat cannot use the user's key (fallback or refusal)

    def as_dict(self) -> dict:
        runs_on = "paused" if self.refusal else "your_key" if self.key_source is KeySource.BYOK else "platform"
        return {
            "runs_on": runs_on,
            "provider": self.provider.value,
            "model": self.model,
            "key_source": self.key_source.value,
            "credits": self.credits,
            "fallback": self.fallback,
            "message": self.refusal.message if self.refusal else self.note,
        }


@dataclass(frozen=True)
class SettingsView:
    settings: ModelSettings
    keys: dict[Provider, HeldKey]
    routes: dict[Feature, Route]
    platform_price: int | None
    key_lifetime_s: int

    def as_dict(self) -> dict:
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


class ChatService:
    def __init__(
        self,
        *,
        store: SettingsStore,
        checker: KeyChecker,
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
        self.feature_models = {**DEFAULT_FEATURE_MODELS, **(feature_models or {})}
        self.key_ttl_s, self.key_check_timeout_s, self.clock = key_ttl_s, key_check_timeout_s, clock

    # --- settings and keys ------------------------------------------------------------------------

    def _default(self, user_id: str) -> ModelSettings:
        return ModelSettings(user_id, self.default_provider, self.default_model)

    async def settings_of(self, user_id: str) -> ModelSettings:
        return await self.store.get(user_id) or self._default(user_id)

    async def state(self, who: Identity, ring: KeyRing | None) -> tuple[ModelSettings, dict[Provider, HeldKey]]:
        """The user's settings and the keys of `ring` the server still honours, in one read."""
        ring = ring or {}
        settings, records = await self.store.load(who.user_id, session_of(who), [k.key_id for k in ring.values()])
        held = {}
        for provider, key in ring.items():
            record = records.get(provider)
            # Bound to its provider: a record of another provider (or none) makes the entry useless.
            if record is not None and record.key_id == key.key_id and record.provider is key.provider:
                held[provider] = HeldKey(key, record)
        return settings or self._default(who.user_id), held

    def route(self, s: ModelSettings, held: Mapping[Provider, HeldKey], feature: Feature) -> Route:
        """Where a call of `feature` runs for these settings and keys (see `Route`)."""
        prices = self.book.in_force(self.clock())
        if feature is not Feature.CHAT:
            # Always the platform's model for the feature, never the one the user chose.
            provider, model = self.feature_models[feature]
            return Route(
                feature,
                KeySource.PLATFORM,
                provider,
                model,
                platform_price(feature, model, prices),
                note=f"{FEATURE_NAMES[feature]} always runs on the platform's {model} and uses credits.",
            )
        provider, model, name = s.provider, s.model, providers.of(s.provider).name
        price = platform_price(feature, model, prices)
        if not s.use_own_key:
            return Route(
                feature,
                KeySource.PLATFORM,
                provider,
                model,
                price,
                note="Chat runs on platform credits."
                if price is not None
                else f"{model} has no platform price: switch on “use my own API key” to call it.",
            )
        key = held.get(provider)
        if key is not None and key.usable:
            return Route(
                feature,
                KeySource.BYOK,
                provider,
                model,
                0,
                held=key,
                note=f"Chat runs on your {name} key {key.record.hint}: no credits.",
            )
        if key is None:
            why = f"This session has no {name} key"
            act = f"Paste your {name} key and press Check"
        else:
            why = f"Your {name} key {key.record.hint} failed its last check ({key.record.status.replace('_', ' ')})"
            act = f"Paste a working {name} key and press Check"
        if s.fallback_to_platform and price is not None:
            return Route(
                feature,
                KeySource.PLATFORM,
                provider,
                model,
                price,
                fallback=True,
                reason=why,
                note=f"{why}, so chat falls back to platform credits, as you chose: "
                f"{price} credit{'s' if price != 1 else ''} per message.",
            )
        refusal = OwnKeyMissing(
            f"{why}, so chat is paused and nothing is charged. {act}, or switch “use my own API key” off "
            "to use platform credits" + (", or allow falling back to platform credits." if price is not None else "."),
            provider=provider.value,
            key_status=key.record.status if key else "missing",
        )
        return Route(feature, KeySource.BYOK, provider, model, 0, held=key, refusal=refusal, reason=why)

    async def view(self, who: Identity, ring: KeyRing | None) -> SettingsView:
        s, held = await self.state(who, ring)
        return self._view(s, held)

    def _view(self, s: ModelSettings, held: Mapping[Provider, HeldKey]) -> SettingsView:
        routes = {f: self.route(s, held, f) for f in Feature}
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
        s, held = await self.state(who, ring)
        if request.model is None:
            route = self.route(s, held, request.feature)
        else:
            route = self.route_for_model(s, held, request.feature, request.model, request.own_key)
        if route.refusal is not None:
            raise route.refusal
        if route.key_source is KeySource.BYOK:
            api_key = (
                route.held.key.api_key if route.held is not None else providers.normalize_key(request.own_key or "")
            )
        else:
            api_key = self.platform_keys.get(route.provider) or ""
            if not api_key:
                raise PlatformKeyMissing(
                    f"The platform has no {providers.of(route.provider).name} key configured. "
                    "Use your own key for chat, or choose another provider."
                )
        self._refuse_unrunnable(route.model, route.key_source)
        return route, api_key

    def route_for_model(
        self, s: ModelSettings, held: Mapping[Provider, HeldKey], feature: Feature, model: str, own_key: str | None
    ) -> Route:
        """The gateway's rule (DESIGN "An OpenAI-compatible gateway"): chat runs `model` on the key the
        request brings (`own_key`, for this call only), else the session cookie's key of its provider,
        else, as the page's chat does, on platform credits unless the user switched BYOK on (then it is
        refused, or falls back when they chose so); the always-platform features run on the platform's
        model for the feature."""
        if feature is not Feature.CHAT:
            return self.route(s, {}, feature)
        provider = provider_for_model(model)
        if provider is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist here. GET /v1/models lists the models you can call.",
                reason="model_not_found",
            )
        name = providers.of(provider).name
        if own_key is not None:
            problem = providers.key_shape_problem(provider, providers.normalize_key(own_key))
            if problem:
                raise InvalidRequest(f"X-Provider-Key: {problem}", reason="invalid_provider_key")
            return Route(feature, KeySource.BYOK, provider, model, 0, note=f"Runs on the {name} key you sent.")
        # The page's rule for this provider and model: the session's key, a refusal, or platform credits.
        return self.route(replace(s, provider=provider, model=model), held, feature)

    def _refuse_unrunnable(self, model: str, key_source: KeySource) -> None:
        """A model id that is not one (settings saved before ids were checked) reaches no provider, and
        the platform's key runs only models the price list in force prices (DESIGN "Credit policy"),
        whatever the feature costs."""
        if not re.fullmatch(MODEL_ID_PATTERN, model):
            raise InvalidRequest(
                "Your saved model is not a valid model id (1 to 100 letters, digits, '.', '_', ':' "
                "or '-'). Choose a model in the settings.",
                reason="invalid_model",
            )
        if key_source is KeySource.PLATFORM:
            prices = self.book.in_force(self.clock())
            if prices.model_price(model) is None:
                raise PaymentRequired(
                    f"{model} has no platform price, so it cannot run on the platform's key. Switch on “use my "
                    "own API key” to call it with your own key (chat only), or choose a priced model.",
                    reason="unpriced_model",
                    price_list_version=prices.version,
                )
