"""Models the page and `GET /v1/models` offer for each provider (any model id is accepted over the API).

Nothing here names a provider: the models are each provider module's `models` (`providers/<name>.py`),
in the registry's order, and so are the names the page shows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import providers
from billing.pricing import PriceList
from schemas.events import Provider


class Catalog(Mapping[Provider, tuple[str, ...]]):
    """The offered models by provider, read from the registry each time (a provider registered later,
    as a test does, is in it at once)."""

    def __getitem__(self, provider: Provider) -> tuple[str, ...]:
        return providers.models()[provider]

    def __iter__(self) -> Iterator[Provider]:
        return iter(providers.models())

    def __len__(self) -> int:
        return len(providers.models())


MODELS: Mapping[Provider, tuple[str, ...]] = Catalog()


def catalog(prices: PriceList) -> dict[str, list[dict[str, Any]]]:
    """The page's catalog: for each provider, its models with their platform price (None: own key only)."""
    return {p.value: [{"id": m, "credits": prices.model_price(m)} for m in models] for p, models in MODELS.items()}


def provider_names() -> dict[str, str]:
    """The name the page shows for each provider (`{"openai": "OpenAI", ...}`), from its module."""
    return {p.value: api.name for p, api in providers.REGISTRY.items()}
