"""The chat service's rules: which key a call runs on, when it is refused, what it is billed.

Entry points (HTTP routes) translate requests into calls of `ChatService`; adapters (PostgreSQL,
Kafka, the credit service, providers, the key checker) are reached through the ports passed in, so
unit tests run these rules with fakes. The credit policy itself is not restated here: `is_billable`,
`price_of` and `decide` come from `services.credits.policy`, the very code the credit service runs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from schemas.events import (
    MODEL_ID_PATTERN, CallStatus, Decision, Feature, KeyCheckResult, KeyCheckStatus, KeySource, ModelCallCompleted,
    Provider, utc_now,
)
from schemas.pricing import PriceBook
from services.chat.balances import BalanceReader, CreditsUnavailable, HoldRefused, Reservation
from services.chat.identity import Identity
from services.chat.key_session import SessionKey
from services.chat.outbox import Outbox
from services.chat.store import ModelSettings, SettingsStore
from services.credits.policy import UnpricedModel, decide, is_billable, price_of
from services.shared.providers import INFO, ChatReply, ProviderError, key_hint, normalize_key

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


class KeyChecker(Protocol):
    """Port: checks a key with its provider (the validation worker, over Kafka request/reply)."""

    async def check(self, user_id: str, provider: Provider, api_key: str, timeout_s: float) -> KeyCheckResult: ...


ModelCaller = Callable[[Provider, str, str, Sequence[Mapping[str, str]]], Awaitable[ChatReply]]
"""Port: one model call `(provider, api_key, model, messages) -> ChatReply`, raising `ProviderError`."""


# --- refusals (translated to HTTP statuses at the edge only) -------------------------------------


class ChatRefused(Exception):
    """A request the service will not carry out, with a sentence the user can act on."""

    code = "refused"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message, self.details = message, details


class PaymentRequired(ChatRefused):
    """A platform call the balance cannot pay for, or a model with no platform price."""

    code = "payment_required"


class OwnKeyMissing(ChatRefused):
    code = "own_key_missing"


class PlatformKeyMissing(ChatRefused):
    code = "platform_key_missing"


class BalanceUnknown(ChatRefused):
    code = "credits_unavailable"


class ProviderFailed(ChatRefused):
    """The provider refused or failed the call; nothing is billed (the event says `failed`)."""

    code = "provider_error"


class InvalidRequest(ChatRefused):
    code = "invalid_request"


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
class CallResult:
    reply: str
    event: ModelCallCompleted
    billing: Billing


@dataclass(frozen=True)
class SettingsChange:
    accepted: bool
    settings: ModelSettings
    check: KeyCheckResult | None = None
    # The key to hold for the session (sealed into the cookie by the edge); never logged or shown.
    keep_key: str | None = field(default=None, repr=False)
    discard_key: bool = False
    message: str = ""


@dataclass(frozen=True)
class SettingsView:
    settings: ModelSettings
    key_in_session: bool
    key_hint: str | None
    key_status: str | None
    key_message: str | None
    platform_price: int | None

    def as_dict(self) -> dict:
        s = self.settings
        return {
            "user_id": s.user_id,
            "provider": s.provider.value,
            "model": s.model,
            "byok": s.use_own_key,
            "use_own_key": s.use_own_key,
            "key_hint": self.key_hint,
            "key_status": self.key_status,
            "key_message": self.key_message,
            "key_in_session": self.key_in_session,
            "mode": "byok" if s.use_own_key else "platform",
            "platform_price": self.platform_price,
        }


class ChatService:
    def __init__(
        self,
        *,
        store: SettingsStore,
        outbox: Outbox,
        balances: BalanceReader,
        checker: KeyChecker,
        call_model: ModelCaller,
        platform_keys: Mapping[Provider, str | None],
        price_book: PriceBook,
        default_provider: Provider = Provider.OPENAI,
        default_model: str = "gpt-4o-mini",
        key_check_timeout_s: float = 15.0,
        clock: Callable[[], datetime] = utc_now,
    ):
        self.store, self.outbox, self.balances, self.checker = store, outbox, balances, checker
        self.call_model, self.platform_keys, self.book = call_model, dict(platform_keys), price_book
        self.default_provider, self.default_model = default_provider, default_model
        self.key_check_timeout_s, self.clock = key_check_timeout_s, clock

    # --- settings ---------------------------------------------------------------------------------

    async def settings_of(self, user_id: str) -> ModelSettings:
        return await self.store.get(user_id) or ModelSettings(user_id, self.default_provider, self.default_model)

    @staticmethod
    def _usable(settings: ModelSettings, key: SessionKey | None) -> bool:
        return settings.use_own_key and key is not None and key.provider is settings.provider

    async def view(self, who: Identity, key: SessionKey | None) -> SettingsView:
        s = await self.settings_of(who.user_id)
        usable = self._usable(s, key)
        if usable:
            same_key = s.key_hint == key.hint
            status = s.key_status if same_key else KeyCheckStatus.VALID.value
            message = s.key_message if same_key else None
        elif s.use_own_key:
            status = "missing"
            message = (f"Your {INFO[s.provider].name} key is kept for one session only. Paste it again to chat "
                       "on your own key, or switch “use my own API key” off to use platform credits.")
        else:
            status = message = None
        price = self.book.in_force(self.clock()).model_price(s.model)
        return SettingsView(s, usable, key.hint if usable else None, status, message, price)

    async def update_settings(
        self, who: Identity, key: SessionKey | None, provider: Provider, model: str, use_own_key: bool,
        api_key: str | None,
    ) -> SettingsChange:
        """Apply new settings; a supplied key is checked first and a refused key changes nothing."""
        model = model.strip()
        if not model:
            raise InvalidRequest("Choose a model.")
        if not re.fullmatch(MODEL_ID_PATTERN, model):
            raise InvalidRequest("A model id is 1 to 100 letters, digits, '.', '_', ':' or '-'. Choose a model "
                                 "from the list.", reason="invalid_model")
        current = await self.settings_of(who.user_id)
        if not use_own_key:
            new = ModelSettings(who.user_id, provider, model)
            await self.store.put(new)
            return SettingsChange(True, new, discard_key=key is not None,
                                  message="Calls now run on the platform's key and use credits.")
        if api_key is not None and normalize_key(api_key):
            api_key = normalize_key(api_key)
            result = await self._check(who, provider, api_key)
            if result.status is not KeyCheckStatus.VALID:
                return SettingsChange(False, current, result, message=result.message)
            hint = result.key_hint or key_hint(api_key)
            new = ModelSettings(who.user_id, provider, model, True, hint, result.status.value, result.message)
            await self.store.put(new)
            return SettingsChange(True, new, result, keep_key=api_key,
                                  message="Chat now runs on your own key: no credits are used for chat.")
        if key is not None and key.provider is provider:
            same = current.key_hint == key.hint
            new = ModelSettings(who.user_id, provider, model, True, key.hint,
                                current.key_status if same else KeyCheckStatus.VALID.value,
                                current.key_message if same else None)
            await self.store.put(new)
            return SettingsChange(True, new, message="Chat runs on your own key: no credits are used for chat.")
        name = INFO[provider].name
        raise OwnKeyMissing(f"Paste your {name} API key and press Check to use it. Keys are kept for this session only.")

    async def _check(self, who: Identity, provider: Provider, api_key: str) -> KeyCheckResult:
        try:
            return await self.checker.check(who.user_id, provider, api_key, self.key_check_timeout_s)
        except (asyncio.TimeoutError, TimeoutError, ConnectionError, OSError) as exc:
            log.warning("key check for %s could not complete: %s", who.user_id, type(exc).__name__)
            return KeyCheckResult(
                request_id=uuid.uuid4(), provider=provider, status=KeyCheckStatus.PROVIDER_UNAVAILABLE,
                message="We could not check your key just now (the key checker did not answer). "
                        "The key may well be fine: try again in a minute.",
                key_hint=key_hint(api_key),
            )

    # --- calls ------------------------------------------------------------------------------------

    async def call(self, who: Identity, key: SessionKey | None, feature: Feature, message: str) -> CallResult:
        """Run one model call for `feature` on the right key; exactly one event records it."""
        if not message.strip():
            raise InvalidRequest("Type a message first.")
        if len(message) > MAX_MESSAGE_CHARS:
            raise InvalidRequest(f"Messages are limited to {MAX_MESSAGE_CHARS} characters.")
        s = await self.settings_of(who.user_id)
        provider, model = s.provider, s.model
        # Only chat may run on the user's key: the other features always run on the platform's models.
        key_source = KeySource.BYOK if feature is Feature.CHAT and s.use_own_key else KeySource.PLATFORM
        if key_source is KeySource.BYOK:
            if not self._usable(s, key):
                raise OwnKeyMissing(
                    f"Your {INFO[provider].name} key is no longer in this session (keys are kept for one session "
                    "only). Paste it again, or switch “use my own API key” off to use platform credits.")
            api_key = key.api_key
        else:
            api_key = self.platform_keys.get(provider)
            if not api_key:
                raise PlatformKeyMissing(f"The platform has no {INFO[provider].name} key configured. "
                                         "Use your own key for chat, or choose another provider.")
        self._refuse_unrunnable(model, key_source)
        pending = ModelCallCompleted(
            event_id=uuid.uuid4(), occurred_at=self.clock(), user_id=who.user_id,
            session_id=who.session_id or "api", request_id=uuid.uuid4().hex, provider=provider, model=model,
            feature=feature, key_source=key_source, status=CallStatus.FAILED,
            input_tokens=0, output_tokens=0, latency_ms=0,
        )
        # The outbox row is written while the price is reserved (two round trips at once); a refused
        # call's row is discarded again, as the call never happened.
        begin = asyncio.ensure_future(self.outbox.begin(pending))
        try:
            reservation = await self._reserve(who, pending)
        except BaseException:
            try:
                await self.outbox.discard(await begin)
            except Exception:
                log.warning("could not discard the outbox row of refused call %s", pending.event_id)
            raise
        try:
            handle = await begin
        except BaseException:
            if reservation is not None:  # the provider is never asked: give the credits back now
                await asyncio.shield(self.balances.release(who, pending.event_id))
            raise
        started = time.monotonic()
        messages = [{"role": "system", "content": FEATURE_PROMPTS[feature]}, {"role": "user", "content": message}]
        try:
            reply = await self.call_model(provider, api_key, model, messages)
        except ProviderError as exc:
            event = self._finished(pending, started, CallStatus.FAILED)
            await self.outbox.complete(handle, event)
            if key_source is KeySource.BYOK:
                await self.store.mark_key(who.user_id, key.hint, exc.verdict.status.value, exc.verdict.message)
            billing = self._billing(event, None)
            whose = "Your" if key_source is KeySource.BYOK else "The platform's"
            raise ProviderFailed(
                exc.verdict.message if key_source is KeySource.BYOK else
                f"{INFO[provider].name} could not answer this call ({exc.verdict.status.value}). No credits were used; "
                "try again in a minute.",
                key_status=exc.verdict.status.value, key_source=key_source.value, whose_key=whose,
                event_id=str(event.event_id), billing=billing.as_dict(),
            ) from None
        except BaseException:
            # Anything else (a bug, a cancelled request): the call is recorded as failed now, not later.
            await asyncio.shield(self.outbox.complete(handle, self._finished(pending, started, CallStatus.FAILED)))
            raise
        event = self._finished(pending, started, CallStatus.SUCCEEDED, reply)
        await self.outbox.complete(handle, event)
        billing = self._billing(event, None if reservation is None else reservation.available + reservation.credits)
        if key_source is KeySource.BYOK and s.key_status != KeyCheckStatus.VALID.value:
            name = INFO[provider].name
            await self.store.mark_key(who.user_id, key.hint, KeyCheckStatus.VALID.value, f"Your {name} key works.")
        return CallResult(reply.text, event, billing)

    def _refuse_unrunnable(self, model: str, key_source: KeySource) -> None:
        """A model id that is not one (settings saved before ids were checked) reaches no provider, and
        the platform's key runs only models the price list in force prices (DESIGN "Credit policy"),
        whatever the feature costs."""
        if not re.fullmatch(MODEL_ID_PATTERN, model):
            raise InvalidRequest("Your saved model is not a valid model id (1 to 100 letters, digits, '.', '_', ':' "
                                 "or '-'). Choose a model in the settings.", reason="invalid_model")
        if key_source is KeySource.PLATFORM:
            prices = self.book.in_force(self.clock())
            if prices.model_price(model) is None:
                raise PaymentRequired(
                    f"{model} has no platform price, so it cannot run on the platform's key. Switch on “use my "
                    "own API key” to call it with your own key (chat only), or choose a priced model.",
                    reason="unpriced_model", price_list_version=prices.version,
                )

    async def _reserve(self, who: Identity, pending: ModelCallCompleted) -> Reservation | None:
        """Reserve a billable call's price at the credit service (an admission hold keyed by the call's
        event id), refusing (402) when the available credits cannot pay or the model has no price."""
        feature, model = pending.feature, pending.model
        if not is_billable(feature, pending.key_source):
            return None
        prices = self.book.in_force(self.clock())
        try:
            price_of(feature, model, prices)
        except UnpricedModel:
            raise PaymentRequired(
                f"{model} has no platform price, so it cannot run on platform credits. Switch on “use my own "
                "API key” to call it with your own key (no credits), or choose a priced model.",
                reason="unpriced_model", price_list_version=prices.version,
            ) from None
        try:
            return await self.balances.reserve(who, pending.event_id, feature, pending.provider, model)
        except CreditsUnavailable as exc:
            raise BalanceUnknown("We cannot reserve credits for this call right now, so platform calls are paused. "
                                 "Try again in a minute, or use your own key for chat.", cause=str(exc)) from None
        except HoldRefused as exc:
            what = FEATURE_NAMES[feature]
            if feature is Feature.CHAT:
                advice = ("Switch on “use my own API key” to chat on your own key without credits, "
                          "or get more credits.")
            else:
                advice = f"{what} always runs on the platform's models, so it needs credits: get more credits."
            raise PaymentRequired(
                f"{what} with {model} costs {exc.needed} credits and you have {max(exc.available, 0)} available "
                f"(credits held by calls still running are not available). {advice}",
                reason="insufficient_credits", needed=exc.needed, available=exc.available,
                balance=exc.available, price_list_version=prices.version, suggest_byok=feature is Feature.CHAT,
            ) from None

    def _finished(self, pending: ModelCallCompleted, started: float, status: CallStatus,
                  reply: ChatReply | None = None) -> ModelCallCompleted:
        # A copy, not a re-validation of the whole event: every changed field is built typed right here.
        changes = {"occurred_at": self.clock(), "status": status, "latency_ms": int((time.monotonic() - started) * 1000)}
        if reply is not None:
            changes.update(input_tokens=max(0, int(reply.input_tokens)), output_tokens=max(0, int(reply.output_tokens)))
        return pending.model_copy(update=changes)

    def _billing(self, event: ModelCallCompleted, balance: int | None) -> Billing:
        charge = decide(event, self.book)
        return Billing(event.key_source, charge.decision, charge.credits, charge.price_list_version, balance)
