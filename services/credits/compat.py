"""The compatibility route's use case: an old client's "deduct credits" for one call, as a chat call.

Old clients call `POST /api/user/deduct-credits` with the feature, model, key source and an idempotency
key of a call they made, never an amount. The call becomes a `model_call_completed` event like any
other (the event log stays the source of truth, finance replays it), decided by the credit consumer
with the same policy, so a BYOK chat is not charged and a platform call is charged once per key.

What may debit is admitted first, as the chat's calls are (DESIGN.md "Admission holds"): its price is
held against the available credits, and the event goes into the credit service's outbox in the same
transaction (`Ledger.hold_and_record`). Not enough available credits: `InsufficientAvailable`, and
nothing is held or recorded. So no sequence of calls to this route, alone or beside the chat, takes a
balance below zero. The event's decision releases the hold.

The HTTP edge (services.credits.api.routes.compat) only translates: a `Deduction` to 200 or 202, each error to its
status.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncpg

from billing.policy import CreditError, is_billable, price_of
from billing.pricing import PriceBook
from providers import provider_of_model
from schemas.events import CallStatus, Feature, KeySource, ModelCallCompleted, Provider
from services.credits.holds import HoldConflict
from services.credits.ledger import Ledger

# Namespace of the event ids the compatibility route derives from (user, idempotency key).
DEDUCT_NAMESPACE = uuid.UUID("5b0c8a52-4f8e-4d7e-9d0c-3f5f2b7c1e01")


class UnknownProvider(CreditError):
    """The model names no provider of the catalog, and the client sent none."""


class KeyReused(CreditError):
    """The idempotency key was used before for a different call."""


@dataclass(frozen=True)
class DeductCall:
    """One call an old client reports (there is deliberately no amount)."""

    user_id: str
    feature: Feature
    model: str
    key_source: KeySource
    idempotency_key: str
    provider: Provider | None = None


@dataclass(frozen=True)
class Deduction:
    """What became of a reported call: `decision` None while it is still pending (then `held` is
    what its hold reserves, 0 for a call that is not billable)."""

    event_id: uuid.UUID
    decision: asyncpg.Record | None = None
    balance: int | None = None
    held: int = 0


def event_id_of(user_id: str, idempotency_key: str) -> uuid.UUID:
    return uuid.uuid5(DEDUCT_NAMESPACE, f"{user_id}\x00{idempotency_key}")


class CompatDeductions:
    """Reports old clients' calls: hold what may debit, record the event, wait a while for its decision."""

    def __init__(self, ledger: Ledger, book: PriceBook, topic: str, wait_s: float, poll_s: float = 0.02):
        self.ledger, self.book, self.topic = ledger, book, topic
        self.wait_s, self.poll_s = wait_s, poll_s

    async def deduct(self, call: DeductCall) -> Deduction:
        """The call's decision (waiting up to `wait_s` for it), or a pending Deduction.

        Raises UnknownProvider, billing.policy.UnpricedModel (a billable call on a model without a
        price), holds.InsufficientAvailable (nothing held, nothing recorded), KeyReused, and
        holds.LedgerBusy (the account stayed locked; nothing held)."""
        provider = call.provider or provider_of_model(call.model)
        if provider is None:
            raise UnknownProvider(f"cannot tell the provider of model {call.model!r}; send 'provider'")
        event_id = event_id_of(call.user_id, call.idempotency_key)
        decided = await self.ledger.decision_of(event_id)
        held = 0
        if decided is None:
            event = ModelCallCompleted(
                event_id=event_id,
                occurred_at=datetime.now(timezone.utc),
                user_id=call.user_id,
                session_id="compat",
                request_id=call.idempotency_key,
                provider=provider,
                model=call.model,
                feature=call.feature,
                key_source=call.key_source,
                status=CallStatus.SUCCEEDED,
                input_tokens=0,
                output_tokens=0,
                latency_ms=0,
            )
            hold = None
            if is_billable(call.feature, call.key_source):
                prices = self.book.in_force(event.occurred_at)
                hold = (price_of(call.feature, call.model, prices), prices.version)
            try:
                placed = await self.ledger.hold_and_record(event, self.topic, hold)
            except HoldConflict as exc:
                # Decided between our look and the hold (a retry that raced its own first attempt), or
                # the key's pending call is another one.
                decided = await self.ledger.decision_of(event_id)
                if decided is None:
                    raise self._reused(call) from exc
            else:
                held = placed.credits if placed is not None else 0
                decided = await self._wait_for_decision(event_id)
        if decided is None:
            return Deduction(event_id, held=held)
        asked = (call.feature.value, call.model, call.key_source.value, provider.value)
        recorded = (decided["feature"], decided["model"], decided["key_source"], decided["provider"])
        if asked != recorded:  # never answer an old decision under new labels
            raise self._reused(call, recorded)
        return Deduction(event_id, decided, (await self.ledger.balance(call.user_id)).balance)

    async def _wait_for_decision(self, event_id: uuid.UUID) -> asyncpg.Record | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        decided = None
        while decided is None and loop.time() < deadline:
            await asyncio.sleep(self.poll_s)
            decided = await self.ledger.decision_of(event_id)
        return decided

    @staticmethod
    def _reused(call: DeductCall, recorded: tuple[str, str, str, str] | None = None) -> KeyReused:
        what = f" ({recorded[0]}, {recorded[1]}, {recorded[2]})" if recorded else ""
        return KeyReused(
            f"idempotency key {call.idempotency_key!r} was already used for a different call{what}; "
            "use a new key for a new call"
        )
