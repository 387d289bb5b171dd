"""The price list (contract, see DESIGN.md "Credit policy"), kept as versioned data.

Each file in `price_lists/` is one version with the moment it takes effect; the version in force
for an event is the newest one whose `effective_from` is not after the event's `occurred_at`.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from datetime import datetime
from functools import cache
from pathlib import Path

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import Feature

PRICE_LIST_DIR = Path(__file__).parent / "price_lists"


class Tier(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    credits: int = Field(gt=0)
    models: list[str]


class PriceList(BaseModel):
    """One version of the prices: credits per successful call, by model and by feature."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: str
    effective_from: AwareDatetime
    feature_prices: dict[Feature, int]
    tiers: dict[str, Tier]
    plans: dict[str, int]

    def __hash__(self) -> int:  # a version is immutable once published
        return hash((self.version, self.effective_from))

    def model_price(self, model: str) -> int | None:
        """Credits for one successful call of `model`, or None when the model is unpriced."""
        return self._model_prices().get(model)

    def _model_prices(self) -> dict[str, int]:
        prices = self.__dict__.get("_prices")
        if prices is None:
            prices = {m: t.credits for t in self.tiers.values() for m in t.models}
            self.__dict__["_prices"] = prices
        return prices


class PriceBook:
    """All versions, ordered by the moment they take effect."""

    def __init__(self, lists: list[PriceList]):
        if not lists:
            raise ValueError("a price book needs at least one price list")
        self.lists = sorted(lists, key=lambda p: p.effective_from)
        self._starts = [p.effective_from for p in self.lists]

    def in_force(self, at: datetime) -> PriceList:
        if len(self.lists) == 1:  # the common case; comparing aware datetimes is not free
            return self.lists[0]
        i = bisect_right(self._starts, at) - 1
        # An event older than every list is priced by the first one rather than refused.
        return self.lists[max(i, 0)]


@cache
def default_price_book(directory: Path = PRICE_LIST_DIR) -> PriceBook:
    return PriceBook([PriceList.model_validate(json.loads(f.read_text())) for f in sorted(directory.glob("*.json"))])
