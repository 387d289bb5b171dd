"""Models the page offers for each provider (any model id is accepted over the API)."""

from __future__ import annotations

from typing import Any

from billing.pricing import PriceList
from schemas.events import Provider

MODELS: dict[Provider, list[str]] = {
    Provider.OPENAI: [
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "o3-mini",
        "o3",
        "gpt-5.2-pro",
    ],
    Provider.ANTHROPIC: [
        "claude-3-5-haiku",
        "claude-sonnet-4",
        "claude-3-7-sonnet",
        "claude-3-5-sonnet",
        "claude-opus-4",
    ],
    Provider.GROQ: [
        "llama3-8b-8192",
        "llama-3.3-70b-versatile",
        "gemma2-9b-it",
        "qwen-qwq-32b",
        "deepseek-r1-distill-llama-70b",
    ],
    # gemini-2.5-flash has no platform price: it runs only on the user's own key.
    Provider.GEMINI: ["gemini-2.5-pro", "gemini-2.5-flash"],
}


def catalog(prices: PriceList) -> dict[str, list[dict[str, Any]]]:
    return {p.value: [{"id": m, "credits": prices.model_price(m)} for m in models] for p, models in MODELS.items()}
