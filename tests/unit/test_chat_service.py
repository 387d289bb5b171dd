"""The chat service's rules with fakes for every port (no services needed)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from schemas.events import CallStatus, Decision, Feature, KeyCheckResult, KeyCheckStatus, KeySource, Provider
from schemas.pricing import default_price_book
from services.chat.balances import CreditsUnavailable, FixedBalances
from services.chat.identity import Identity
from services.chat.key_session import SessionKey
from services.chat.outbox import MemoryOutbox
from services.chat.service import (
    BalanceUnknown, ChatService, OwnKeyMissing, PaymentRequired, PlatformKeyMissing, ProviderFailed,
)
from services.chat.store import MemorySettingsStore, ModelSettings
from services.shared.providers import ChatReply, KeyVerdict, ProviderError, key_hint

pytestmark = pytest.mark.unit

USER_KEY = "sk-proj-userOWNkey000000000000000001"
PLATFORM_KEY = "sk-platform-key-0000000000000000000001"
ALICE = Identity("alice", "user", "sess-1", "token-a")


class FakeChecker:
    def __init__(self, status: KeyCheckStatus = KeyCheckStatus.VALID):
        self.status, self.calls = status, []

    async def check(self, user_id, provider, api_key, timeout_s):
        self.calls.append((user_id, provider, api_key))
        return KeyCheckResult(request_id=uuid.uuid4(), provider=provider, status=self.status,
                              message=f"checked: {self.status.value}", key_hint=key_hint(api_key))


class FakeProvider:
    """Answers with usage, or raises the given provider error; records which key each call used."""

    def __init__(self):
        self.calls: list[tuple[Provider, str, str]] = []
        self.error: ProviderError | None = None

    async def __call__(self, provider, api_key, model, messages):
        self.calls.append((provider, api_key, model))
        if self.error:
            raise self.error
        return ChatReply("an answer", 11, 7, model)


def make(balance: int = 100, checker=None, platform_keys=None):
    store, outbox, provider = MemorySettingsStore(), MemoryOutbox(), FakeProvider()
    service = ChatService(
        store=store, outbox=outbox, balances=FixedBalances({"alice": balance}), checker=checker or FakeChecker(),
        call_model=provider, platform_keys=platform_keys or {p: PLATFORM_KEY for p in Provider},
        price_book=default_price_book(),
    )
    return service, store, outbox, provider


def session_key(provider=Provider.OPENAI, key=USER_KEY) -> SessionKey:
    return SessionKey(provider, key, key_hint(key), int(time.time()) + 60)


async def byok_on(service, provider=Provider.OPENAI, model="gpt-4o"):
    change = await service.update_settings(ALICE, None, provider, model, True, USER_KEY)
    assert change.accepted and change.keep_key == USER_KEY
    return session_key(provider)


async def test_platform_chat_uses_platform_key_and_is_billed_by_the_shared_policy():
    service, _, outbox, provider = make(balance=100)
    await service.update_settings(ALICE, None, Provider.OPENAI, "gpt-4o", False, None)
    result = await service.call(ALICE, None, Feature.CHAT, "hello")
    assert provider.calls == [(Provider.OPENAI, PLATFORM_KEY, "gpt-4o")]
    assert result.event.key_source is KeySource.PLATFORM and result.event.status is CallStatus.SUCCEEDED
    assert (result.event.input_tokens, result.event.output_tokens) == (11, 7)
    assert result.billing.decision is Decision.DEBITED and result.billing.credits == 5
    assert result.billing.as_dict()["balance_after"] == 95
    assert outbox.events == [result.event] and outbox.rows[1][1] is True


async def test_byok_chat_uses_the_users_key_and_costs_nothing():
    service, _, outbox, provider = make(balance=0)  # no credits needed
    key = await byok_on(service)
    result = await service.call(ALICE, key, Feature.CHAT, "hello")
    assert provider.calls[-1] == (Provider.OPENAI, USER_KEY, "gpt-4o")
    assert result.event.key_source is KeySource.BYOK
    assert result.billing.decision is Decision.NOT_BILLED_BYOK and result.billing.credits == 0
    assert "sk-proj-userOWN" not in outbox.events[0].to_json().decode()


@pytest.mark.parametrize("feature, credits", [(Feature.DEEP_ANALYSIS, 50), (Feature.CODE_FIX, 1), (Feature.CODE_CANVAS, 1)])
async def test_other_features_always_run_on_the_platform_key_even_with_byok_on(feature, credits):
    service, _, _, provider = make(balance=100)
    key = await byok_on(service)
    result = await service.call(ALICE, key, feature, "analyse this")
    assert provider.calls[-1][1] == PLATFORM_KEY
    assert result.event.key_source is KeySource.PLATFORM
    assert result.billing.decision is Decision.DEBITED and result.billing.credits == credits


async def test_short_balance_is_refused_before_the_call_with_a_byok_suggestion():
    service, _, outbox, provider = make(balance=4)
    await service.update_settings(ALICE, None, Provider.OPENAI, "gpt-4o", False, None)
    with pytest.raises(PaymentRequired) as exc:
        await service.call(ALICE, None, Feature.CHAT, "hello")
    assert exc.value.details["reason"] == "insufficient_credits" and exc.value.details["suggest_byok"] is True
    assert "own API key" in exc.value.message and "costs 5 credits" in exc.value.message
    assert provider.calls == [] and outbox.events == []


async def test_short_balance_for_deep_analysis_does_not_suggest_byok():
    service, _, _, _ = make(balance=10)
    with pytest.raises(PaymentRequired) as exc:
        await service.call(ALICE, None, Feature.DEEP_ANALYSIS, "go deep")
    assert exc.value.details["suggest_byok"] is False and "always runs on the platform" in exc.value.message


async def test_unpriced_model_is_refused_on_the_platform_but_runs_on_the_users_key():
    service, _, outbox, provider = make(balance=1000)
    await service.update_settings(ALICE, None, Provider.GEMINI, "gemini-2.5-flash", False, None)
    with pytest.raises(PaymentRequired) as exc:
        await service.call(ALICE, None, Feature.CHAT, "hello")
    assert exc.value.details["reason"] == "unpriced_model" and provider.calls == []
    key = await byok_on(service, Provider.GEMINI, "gemini-2.5-flash")
    result = await service.call(ALICE, key, Feature.CHAT, "hello")
    assert result.billing.decision is Decision.NOT_BILLED_BYOK


async def test_provider_error_on_the_users_key_is_worded_like_the_check_and_marks_the_key():
    service, store, outbox, provider = make()
    key = await byok_on(service)
    message = "This OpenAI key has been revoked or has expired. Create a new key."
    provider.error = ProviderError(Provider.OPENAI, KeyVerdict(KeyCheckStatus.REVOKED_OR_EXPIRED, message), 401)
    with pytest.raises(ProviderFailed) as exc:
        await service.call(ALICE, key, Feature.CHAT, "hello")
    assert exc.value.message == message and exc.value.details["key_status"] == "revoked_or_expired"
    assert exc.value.details["billing"]["charged"] is False
    assert (await store.get("alice")).key_status == "revoked_or_expired"
    view = await service.view(ALICE, key)
    assert view.key_status == "revoked_or_expired" and view.key_message == message
    [event] = outbox.events
    assert event.status is CallStatus.FAILED and event.key_source is KeySource.BYOK


async def test_a_later_success_marks_the_key_valid_again():
    service, store, _, provider = make()
    key = await byok_on(service)
    provider.error = ProviderError(Provider.OPENAI, KeyVerdict(KeyCheckStatus.RATE_LIMITED, "wait"), 429)
    with pytest.raises(ProviderFailed):
        await service.call(ALICE, key, Feature.CHAT, "hello")
    provider.error = None
    await service.call(ALICE, key, Feature.CHAT, "hello")
    assert (await store.get("alice")).key_status == "valid"


async def test_every_call_has_one_event_with_a_fresh_id():
    service, _, outbox, _ = make(balance=1000)
    for _ in range(3):
        await service.call(ALICE, None, Feature.CODE_FIX, "fix")
    ids = [e.event_id for e in outbox.events]
    assert len(ids) == 3 == len(set(ids))


async def test_a_refused_key_changes_nothing():
    service, store, _, _ = make(checker=FakeChecker(KeyCheckStatus.REVOKED_OR_EXPIRED))
    await service.update_settings(ALICE, None, Provider.OPENAI, "gpt-4o", False, None)
    before = await store.get("alice")
    change = await service.update_settings(ALICE, None, Provider.GROQ, "llama3-8b-8192", True, "gsk_revoked000000000000001")
    assert not change.accepted and change.keep_key is None and not change.discard_key
    assert change.check.status is KeyCheckStatus.REVOKED_OR_EXPIRED
    assert await store.get("alice") == before


async def test_switching_byok_off_discards_the_key():
    service, store, _, _ = make()
    key = await byok_on(service)
    change = await service.update_settings(ALICE, key, Provider.OPENAI, "gpt-4o", False, None)
    assert change.accepted and change.discard_key
    assert await store.get("alice") == ModelSettings("alice", Provider.OPENAI, "gpt-4o")


async def test_byok_without_a_key_in_the_session_is_refused_not_silently_billed():
    service, _, outbox, provider = make()
    await byok_on(service)
    with pytest.raises(OwnKeyMissing):
        await service.call(ALICE, None, Feature.CHAT, "hello")  # the cookie expired or was dropped
    with pytest.raises(OwnKeyMissing):
        await service.call(ALICE, session_key(Provider.GROQ), Feature.CHAT, "hello")  # a key of another provider
    assert provider.calls == [] and outbox.events == []
    view = await service.view(ALICE, None)
    assert view.settings.use_own_key and view.key_status == "missing" and not view.key_in_session


async def test_keeping_byok_while_changing_model_needs_no_new_check():
    checker = FakeChecker()
    service, store, _, _ = make(checker=checker)
    key = await byok_on(service)
    change = await service.update_settings(ALICE, key, Provider.OPENAI, "gpt-4.1", True, None)
    assert change.accepted and change.keep_key is None and len(checker.calls) == 1
    assert (await store.get("alice")).model == "gpt-4.1"
    with pytest.raises(OwnKeyMissing):
        await service.update_settings(ALICE, key, Provider.ANTHROPIC, "claude-sonnet-4", True, None)


async def test_checker_timeout_answers_provider_unavailable_and_keeps_settings():
    class SlowChecker:
        async def check(self, *args):
            raise TimeoutError

    service, store, _, _ = make(checker=SlowChecker())
    change = await service.update_settings(ALICE, None, Provider.OPENAI, "gpt-4o", True, USER_KEY)
    assert not change.accepted and change.check.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert await store.get("alice") is None


async def test_unknown_balance_pauses_platform_calls_but_not_byok_chat():
    class DownCredits(FixedBalances):
        async def reserve(self, *args):
            raise CreditsUnavailable("down")

    service, _, _, _ = make()
    service.balances = DownCredits()
    with pytest.raises(BalanceUnknown):
        await service.call(ALICE, None, Feature.CHAT, "hello")
    key = await byok_on(service)
    assert (await service.call(ALICE, key, Feature.CHAT, "hello")).billing.credits == 0


async def test_missing_platform_key_is_refused():
    service, _, _, _ = make(platform_keys={p: None for p in Provider})
    with pytest.raises(PlatformKeyMissing):
        await service.call(ALICE, None, Feature.CHAT, "hello")


async def test_a_billable_call_holds_its_price_while_it_runs_and_the_ledger_settles_it():
    service, _, outbox, provider = make(balance=10)
    seen = {}
    real_call = service.call_model

    async def call_model(*args):
        seen["funds"] = await service.balances.funds(ALICE)  # while the provider works
        return await real_call(*args)

    service.call_model = call_model
    result = await service.call(ALICE, None, Feature.CHAT, "hello")
    assert seen["funds"].held == 3 and seen["funds"].available == 7  # gpt-4o-mini: 3 credits
    assert result.billing.as_dict()["balance_before"] == 10 and result.billing.as_dict()["balance_after"] == 7
    service.balances.settle(result.event.event_id, 3)
    assert (await service.balances.funds(ALICE)).available == 7


async def test_concurrent_calls_cannot_overspend_the_held_credits():
    service, _, outbox, provider = make(balance=10)
    gate = asyncio.Event()
    real_call = service.call_model

    async def slow_call(*args):
        await gate.wait()
        return await real_call(*args)

    service.call_model = slow_call
    calls = [asyncio.ensure_future(service.call(ALICE, None, Feature.CHAT, "hi")) for _ in range(6)]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    served = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, PaymentRequired)]
    assert len(served) == 3 and len(refused) == 3  # 3 x 3 credits fit in 10, a fourth does not
    assert refused[0].details["available"] == 1 and "1 available" in refused[0].message
    assert len(outbox.events) == 3  # the refused calls left no event behind


async def test_a_hold_is_released_when_the_provider_is_never_asked():
    service, _, outbox, provider = make(balance=10)

    async def broken_begin(pending):
        raise ConnectionError("database away")

    outbox.begin = broken_begin
    with pytest.raises(ConnectionError):
        await service.call(ALICE, None, Feature.CHAT, "hello")
    assert service.balances.holds == {} and provider.calls == []
