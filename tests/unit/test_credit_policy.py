from datetime import datetime, timezone

import pytest

from billing.policy import decide
from billing.pricing import PriceBook, PriceList, default_price_book
from schemas.events import CallStatus, Decision, Feature, KeySource
from tests.support import make_event

pytestmark = pytest.mark.unit

BOOK = default_price_book()


@pytest.mark.parametrize(
    "feature,key_source,model,expected",
    [
        (Feature.CHAT, KeySource.PLATFORM, "gpt-4o", (Decision.DEBITED, 5)),
        (Feature.CHAT, KeySource.PLATFORM, "claude-3-5-haiku", (Decision.DEBITED, 1)),
        (Feature.CHAT, KeySource.PLATFORM, "gpt-4o-mini", (Decision.DEBITED, 3)),
        (Feature.CHAT, KeySource.PLATFORM, "o1", (Decision.DEBITED, 20)),
        (Feature.CHAT, KeySource.PLATFORM, "gpt-5.2-pro", (Decision.DEBITED, 50)),
        (Feature.CHAT, KeySource.BYOK, "gpt-4o", (Decision.NOT_BILLED_BYOK, 0)),
        (Feature.CHAT, KeySource.BYOK, "some-model-we-never-priced", (Decision.NOT_BILLED_BYOK, 0)),
        # The three platform-only features are billed whatever the event says about the key.
        (Feature.DEEP_ANALYSIS, KeySource.BYOK, "gpt-4o", (Decision.DEBITED, 50)),
        (Feature.DEEP_ANALYSIS, KeySource.PLATFORM, "claude-3-5-haiku", (Decision.DEBITED, 50)),
        (Feature.CODE_FIX, KeySource.BYOK, "gpt-4o", (Decision.DEBITED, 1)),
        (Feature.CODE_CANVAS, KeySource.BYOK, "o1", (Decision.DEBITED, 1)),
        (Feature.CODE_CANVAS, KeySource.PLATFORM, "unpriced-model", (Decision.DEBITED, 1)),
    ],
)
def test_successful_calls(feature, key_source, model, expected):
    charge = decide(make_event(feature=feature, key_source=key_source, model=model), BOOK)
    assert (charge.decision, charge.credits) == expected
    assert charge.price_list_version == "2026-01"


@pytest.mark.parametrize("feature", list(Feature))
@pytest.mark.parametrize("key_source", list(KeySource))
def test_failed_calls_are_never_billed(feature, key_source):
    charge = decide(make_event(feature=feature, key_source=key_source, status=CallStatus.FAILED), BOOK)
    assert (charge.decision, charge.credits) == (Decision.NOT_BILLED_FAILED, 0)


def test_an_unpriced_billable_model_is_rejected_with_the_reason_never_billed_cheap():
    charge = decide(make_event(model="gpt-9-ultra", key_source=KeySource.PLATFORM), BOOK)
    assert (charge.decision, charge.credits) == (Decision.REJECTED, 0)
    assert "gpt-9-ultra" in charge.reason and "2026-01" in charge.reason


def test_the_price_list_in_force_when_the_call_happened_is_used():
    first = BOOK.lists[0]
    raised = PriceList.model_validate(
        first.model_dump()
        | {
            "version": "2026-06",
            "effective_from": datetime(2026, 6, 1, tzinfo=timezone.utc),
            "tiers": {"3": {"credits": 7, "models": ["gpt-4o"]}},
        }
    )
    book = PriceBook([first, raised])
    # (Events may not lie in the future: the switch is in the past.)
    before = decide(make_event(occurred_at=datetime(2026, 5, 31, 23, 59, tzinfo=timezone.utc)), book)
    after = decide(make_event(occurred_at=datetime(2026, 6, 1, tzinfo=timezone.utc)), book)
    assert (before.credits, before.price_list_version) == (5, "2026-01")
    assert (after.credits, after.price_list_version) == (7, "2026-06")


def test_every_model_of_the_design_is_priced():
    prices = BOOK.lists[0]
    for model in [
        "claude-3-5-haiku",
        "llama3-8b-8192",
        "gemma2-9b-it",
        "llama-4-scout",
        "qwen-qwq-32b",
        "deepseek-r1-distill-llama-70b",
        "mistral-saba-24b",
        "gemini-2.5-pro",
        "claude-opus-4",
    ]:
        assert prices.model_price(model) is not None, model
    assert prices.plans == {"free": 50, "standard": 500}
