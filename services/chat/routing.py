"""Where a call runs (pure): the routing rule, the features' models and prompts, and the page's call.

No I/O: `ChatService` reads the user's settings and keys and asks `Router`; the call use case
(`services/chat/calls.py`) runs what it decides.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import providers
from billing.policy import platform_price
from billing.pricing import PriceBook
from schemas.events import MODEL_ID_PATTERN, Feature, KeyCheckStatus, KeySource, Provider, utc_now
from services.chat.call_request import CallRequest
from services.chat.catalog import MODELS
from services.chat.identity import Identity
from services.chat.key_session import SessionKey
from services.chat.refusals import ChatRefused, InvalidRequest, ModelNotFound, OwnKeyMissing, PaymentRequired
from services.chat.store import KeyRecord, ModelSettings

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


def page_request(feature: Feature, message: str, shown: tuple[str, str, int | None] | None = None) -> CallRequest:
    """The page's message as a call: the feature's prompt, then the message; `shown`, the route the page
    showed for it (key source, model, credits), which the call must take or be refused."""
    if not message.strip():
        raise InvalidRequest("Type a message first.")
    if len(message) > MAX_MESSAGE_CHARS:
        raise InvalidRequest(
            f"Messages are limited to {MAX_MESSAGE_CHARS:,} characters and this one has {len(message):,}. "
            "Shorten it or send it in parts.",
            reason="message_too_long",
        )
    return CallRequest(
        feature,
        ({"role": "system", "content": FEATURE_PROMPTS[feature]}, {"role": "user", "content": message}),
        shown=shown,
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
class LiveKey:
    """A key the session's cookie holds and the server still honours (live, not revoked)."""

    key: SessionKey
    record: KeyRecord

    @property
    def usable(self) -> bool:
        return self.record.status not in DEAD_KEY_STATUSES

    def as_dict(self) -> dict[str, Any]:
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
    key: LiveKey | None = None  # the user's key it runs on (BYOK chat only)
    fallback: bool = False  # BYOK chat on platform credits because the user chose to fall back
    refusal: ChatRefused | None = None  # why it will not run at all
    note: str = ""
    reason: str = ""  # why a BYOK chat cannot use the user's key (fallback or refusal)

    def as_dict(self) -> dict[str, Any]:
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


class Router:
    """The routing rule, pure: where a call of a feature runs, on which key, at what price, or why it
    will not run, from the user's settings and the keys their session holds. The page's status line,
    `POST /chat` and the gateway all ask it, so what the page says a feature will do is what it does."""

    def __init__(
        self,
        price_book: PriceBook,
        *,
        default_provider: Provider = Provider.OPENAI,
        feature_models: Mapping[Feature, tuple[Provider, str]] | None = None,
        clock: Callable[[], datetime] = utc_now,
    ):
        self.book, self.default_provider, self.clock = price_book, default_provider, clock
        self.feature_models = {**DEFAULT_FEATURE_MODELS, **(feature_models or {})}

    def route(self, s: ModelSettings, held: Mapping[Provider, LiveKey], feature: Feature) -> Route:
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
                key=key,
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
        return Route(feature, KeySource.BYOK, provider, model, 0, key=key, refusal=refusal, reason=why)

    @staticmethod
    def needs_state(feature: Feature, model: str | None, own_key: str | None) -> bool:
        """Whether the route depends on the user's settings and session keys: not for the gateway's chat
        on the key the request brings, which `route_for_model` runs on that key whatever they say."""
        return not (feature is Feature.CHAT and model is not None and own_key is not None)

    def route_for_model(
        self, s: ModelSettings, held: Mapping[Provider, LiveKey], feature: Feature, model: str, own_key: str | None
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

    def refuse_unrunnable(self, model: str, key_source: KeySource) -> None:
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
