"""The credit policy (contract, see DESIGN.md "Credit policy"), as a pure function.

Kept free of I/O so the credit service, the compatibility route and finance's reconciliation all
decide with the very same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from billing.pricing import PriceBook, PriceList
from schemas.events import CallStatus, Decision, Feature, KeySource, ModelCallCompleted

# These run on the platform's models whatever the event says, so they are always billed.
ALWAYS_PLATFORM = frozenset({Feature.DEEP_ANALYSIS, Feature.CODE_FIX, Feature.CODE_CANVAS})


class CreditError(Exception):
    """Base of the credit domain's errors."""


class UnpricedModel(CreditError):
    def __init__(self, model: str, version: str):
        super().__init__(f"model {model!r} has no price in price list {version}; not billed at a guessed price")
        self.model, self.version = model, version


@dataclass(frozen=True)
class Charge:
    """What one event owes."""

    decision: Decision
    credits: int
    price_list_version: str | None
    reason: str | None = None


def is_billable(feature: Feature, key_source: KeySource) -> bool:
    return key_source is KeySource.PLATFORM or feature in ALWAYS_PLATFORM


def platform_price(feature: Feature, model: str, prices: PriceList) -> int | None:
    """Credits one successful call of `feature` on `model` costs on the platform's key: the feature's
    flat price for the always-platform features, else the model's; None when the model is unpriced."""
    if feature in ALWAYS_PLATFORM:
        return prices.feature_prices[feature]
    return prices.model_price(model)


def price_of(feature: Feature, model: str, prices: PriceList) -> int:
    """Credits for one successful billable call; raises UnpricedModel rather than guess."""
    credits = platform_price(feature, model, prices)
    if credits is None:
        raise UnpricedModel(model, prices.version)
    return credits


def decide(event: ModelCallCompleted, book: PriceBook) -> Charge:
    """What `event` owes under the price list in force when it occurred."""
    return _charge(book.in_force(event.occurred_at), event.status, event.feature, event.key_source, event.model)


# A charge depends only on these five values, and there are few distinct combinations: caching them
# takes the policy off the hot path of a batch of thousands of events.
@lru_cache(maxsize=4096)
def _charge(prices: PriceList, status: CallStatus, feature: Feature, key_source: KeySource, model: str) -> Charge:
    if status is CallStatus.FAILED:
        return Charge(Decision.NOT_BILLED_FAILED, 0, prices.version)
    if not is_billable(feature, key_source):
        return Charge(Decision.NOT_BILLED_BYOK, 0, prices.version)
    try:
        return Charge(Decision.DEBITED, price_of(feature, model, prices), prices.version)
    except UnpricedModel as exc:
        return Charge(Decision.REJECTED, 0, prices.version, reason=str(exc))
