"""What a call ends as: its event, its billing and the answer every retry with its key gets.
Pure functions of the call's plan and how it ended; `services/chat/calls.py` runs the call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import providers
from billing.policy import decide
from billing.pricing import PriceBook
from providers import ChatReply, ProviderError
from schemas.events import CallStatus, Decision, Ending, Feature, KeyCheckStatus, KeySource, ModelCallCompleted
from services.chat.call_store import INTERRUPTED_STATUS, Outcome, interrupted_body
from services.chat.credit_account import HoldRefused, Reservation
from services.chat.identity import Identity
from services.chat.refusals import PaymentRequired
from services.chat.routing import FEATURE_NAMES, Route


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

    def as_dict(self) -> dict[str, Any]:
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
class CallPlan:
    """What one running call needs, decided before it starts."""

    who: Identity
    key: str
    route: Route
    api_key: str
    messages: list[dict[str, str]]
    pending: ModelCallCompleted
    handle: int
    reservation: Reservation | None
    max_tokens: int = 1024


def ended_event(
    call: CallPlan, deltas: list[str], started: float, ending: Ending, reply: ChatReply | None, now: datetime
) -> ModelCallCompleted:
    """The call's event as it ended: status by ending (a Stop after text counts as succeeded), tokens
    from the provider's usage, estimated when a Stop cut the stream before it came."""
    text = "".join(deltas)
    succeeded = ending is Ending.COMPLETED or (ending is Ending.STOPPED and bool(text))
    changes: dict[str, Any] = {
        "occurred_at": now,
        "status": CallStatus.SUCCEEDED if succeeded else CallStatus.FAILED,
        "latency_ms": int((time.monotonic() - started) * 1000),
        "ending": ending,
    }
    if reply is not None:
        changes.update(input_tokens=max(0, int(reply.input_tokens)), output_tokens=max(0, int(reply.output_tokens)))
    elif succeeded:  # stopped mid-stream: the provider's usage never came; about 4 characters a token
        prompt = sum(len(m["content"]) for m in call.messages)
        changes.update(input_tokens=max(1, prompt // 4), output_tokens=max(1, len(text) // 4))
    return call.pending.model_copy(update=changes)


def billing_of(call: CallPlan, event: ModelCallCompleted, book: PriceBook) -> Billing:
    """What the policy the credit service runs will decide for `event`, with the balance it started from."""
    charge = decide(event, book)
    before = None if call.reservation is None else call.reservation.available + call.reservation.credits
    return Billing(event.key_source, charge.decision, charge.credits, charge.price_list_version, before)


def outcome_of(
    call: CallPlan,
    deltas: list[str],
    event: ModelCallCompleted,
    error: ProviderError | None,
    reply: ChatReply | None,
    book: PriceBook,
) -> Outcome:
    """The answer a call ended with (and every retry with its key gets): 200 with the reply and billing,
    502 with a sentence when the provider failed, 503 when it was interrupted."""
    route, billing = call.route, billing_of(call, event, book)
    ending = event.ending or Ending.COMPLETED
    if event.status is CallStatus.SUCCEEDED or ending is Ending.STOPPED:
        notice = None
        if route.fallback:
            notice = (
                f"{route.reason}, so this answer ran on platform credits, as you chose: "
                f"{billing.credits} credit{'s' if billing.credits != 1 else ''} charged."
            )
        if ending is Ending.STOPPED:
            notice = (
                "Stopped after the answer had started: the provider worked on it, so it is charged as a whole call."
                if billing.charged
                else "Stopped before the answer started: nothing is charged."
                if event.status is CallStatus.FAILED
                else "Stopped: your own key paid the provider; no credits."
            )
        text = reply.text if reply is not None else "".join(deltas)
        return Outcome(200, answer_body(call, event, billing, text, notice))
    if ending is Ending.INTERRUPTED:
        return Outcome(INTERRUPTED_STATUS, {**interrupted_body(), "event_id": str(event.event_id)})
    name = providers.of(route.provider).name
    if error is not None and route.key_source is KeySource.BYOK:
        message = error.verdict.message
    elif ending is Ending.TIMEOUT:
        message = f"{name} did not finish this call in time. No credits were used; try again in a minute."
    else:
        status = error.verdict.status.value if error is not None else "unreadable answer"
        message = f"{name} could not answer this call ({status}). No credits were used; try again in a minute."
    return Outcome(
        502,
        {
            "error": "provider_error",
            "message": message,
            "key_status": error.verdict.status.value if error is not None else KeyCheckStatus.PROVIDER_UNAVAILABLE,
            "key_source": route.key_source.value,
            "whose_key": "Your" if route.key_source is KeySource.BYOK else "The platform's",
            "event_id": str(event.event_id),
            "ending": ending.value,
            "charged": False,
            "billing": billing.as_dict(),
        },
    )


def unrecorded_outcome(call: CallPlan, failed: ModelCallCompleted, outcome: Outcome, book: PriceBook) -> Outcome:
    """The answer of a call that ended while its record could not be written (the database away): the
    text it had, not charged, since the event written later says failed."""
    billing = billing_of(call, failed, book)
    notice = "This answer could not be recorded (our database is away for a moment), so it is not charged."
    text = str(outcome.body.get("reply") or "")
    return Outcome(200, answer_body(call, failed, billing, text, notice))


def answer_body(
    call: CallPlan, event: ModelCallCompleted, billing: Billing, text: str, notice: str | None
) -> dict[str, Any]:
    return {
        "reply": text,
        "provider": event.provider.value,
        "model": event.model,
        "feature": event.feature.value,
        "key_source": event.key_source.value,
        "event_id": str(event.event_id),
        "idempotency_key": None if call.key.startswith("auto-") else call.key,
        "usage": {"input_tokens": event.input_tokens, "output_tokens": event.output_tokens},
        "latency_ms": event.latency_ms,
        "ending": (event.ending or Ending.COMPLETED).value,
        "charged": billing.decision is Decision.DEBITED,
        "billing": billing.as_dict(),
        # BYOK chat that ran on platform credits because the user chose to fall back: said so.
        "fallback": call.route.fallback,
        "notice": notice,
    }


def short_of_credits(pending: ModelCallCompleted, exc: HoldRefused, price_list_version: str) -> PaymentRequired:
    """The 402 of a call whose price the available credits cannot hold."""
    feature, model = pending.feature, pending.model
    what = FEATURE_NAMES[feature]
    if feature is Feature.CHAT:
        advice = "Switch on “use my own API key” to chat on your own key without credits, or get more credits."
    else:
        advice = f"{what} always runs on the platform's models, so it needs credits: get more credits."
    return PaymentRequired(
        f"{what} with {model} costs {exc.needed} credit{'s' if exc.needed != 1 else ''} and you have "
        f"{max(exc.available, 0)} available"
        f"{f' ({exc.held} more are held by calls still running)' if exc.held else ''}. {advice}",
        reason="insufficient_credits",
        needed=exc.needed,
        available=exc.available,
        held=exc.held,
        balance=exc.available + exc.held,
        price_list_version=price_list_version,
        suggest_byok=feature is Feature.CHAT,
    )
