"""The chat service's rules with fakes for every port (no services needed)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from types import SimpleNamespace

import pytest

from billing.pricing import default_price_book
from providers import KeyVerdict, ProviderError, key_hint
from schemas.events import CallStatus, Decision, Ending, Feature, KeyCheckStatus, KeySource, Provider
from services.chat.call_answers import Billing
from services.chat.call_request import CallRequest
from services.chat.call_store import Outcome
from services.chat.calls import ChatCalls
from services.chat.credit_account import CreditsUnavailable
from services.chat.identity import Identity
from services.chat.key_session import SessionKey
from services.chat.refusals import (
    BalanceUnknown,
    OwnKeyMissing,
    PaymentRequired,
    PlatformKeyMissing,
    ProviderFailed,
    SettingsChanged,
)
from services.chat.routing import page_request
from services.chat.service import ChatService
from services.chat.store import ModelSettings
from tests.fakes import FakeChecker, FakeProvider, MemoryCallStore, MemoryCredits, MemorySettingsStore
from tests.support import PLATFORM_KEY

pytestmark = pytest.mark.unit

USER_KEY = "sk-proj-userOWNkey000000000000000001"
ALICE = Identity("alice", "user", "sess-1", "token-a")


class Calling:
    """ChatService with ChatCalls' call as these tests use it: the result of a call that answered, the
    refusal raised otherwise (as the HTTP edge turns them into statuses)."""

    def __init__(self, service: ChatService, calls: ChatCalls, store: MemoryCallStore):
        self.__dict__.update(service=service, calls=calls, call_store=store)

    def _owner(self, name):
        if name == "call_model":
            return self.calls.runner
        return self.calls if name in ("balances", "release_again_s") else self.service

    def __getattr__(self, name):
        return getattr(self._owner(name), name)

    def __setattr__(self, name, value):
        setattr(self._owner(name), name, value)

    async def call(self, who, ring, feature, message, **kw):
        started = await self.calls.start(who, ring, page_request(feature, message), **kw)
        outcome = started if isinstance(started, Outcome) else await started.result()
        body = dict(outcome.body)
        if outcome.status == 502:
            raise ProviderFailed(body.pop("message"), **body)
        if outcome.status == 503 and body.get("error") == BalanceUnknown.code:
            raise BalanceUnknown(body.pop("message"), **body)
        assert outcome.ok, outcome
        [event] = [e for e in self.call_store.events if str(e.event_id) == body["event_id"]]
        b = body["billing"]
        billing = Billing(
            KeySource(b["key_source"]),
            Decision(b["decision"]),
            b["credits"],
            b["price_list_version"],
            b["balance_before"],
        )
        return SimpleNamespace(
            event=event,
            billing=billing,
            reply=body["reply"],
            fallback=body["fallback"],
            notice=body["notice"],
            body=body,
        )


def make(balance: int = 100, checker=None, platform_keys=None):
    store, outbox, provider = MemorySettingsStore(), MemoryCallStore(), FakeProvider()
    service = ChatService(
        store=store,
        checker=checker or FakeChecker(),
        platform_keys=platform_keys or {p: PLATFORM_KEY for p in Provider},
        price_book=default_price_book(),
    )
    calls = ChatCalls(
        service=service,
        store=outbox,
        keys=store,
        balances=MemoryCredits({"alice": balance}),
        call_model=provider,
        stream_model=None,
        price_book=service.book,
    )
    return Calling(service, calls, outbox), store, outbox, provider


def session_key(provider=Provider.OPENAI, key=USER_KEY) -> SessionKey:
    """A key the cookie could hold but the server never recorded."""
    return SessionKey(uuid.uuid4(), provider, key, key_hint(key), int(time.time()) + 60)


async def byok_on(service, provider=Provider.OPENAI, model="gpt-4o", ring=None, key=USER_KEY, who=ALICE):
    """Check `key` for `provider` with BYOK on; the session's ring of keys afterwards."""
    change = await service.update_settings(who, ring, provider, model, True, key)
    assert change.accepted and change.keep_key.api_key == key and change.keep_key.provider is provider
    return {**(ring or {}), provider: change.keep_key}


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


@pytest.mark.parametrize(
    "feature, credits", [(Feature.DEEP_ANALYSIS, 50), (Feature.CODE_FIX, 1), (Feature.CODE_CANVAS, 1)]
)
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


async def test_a_call_the_page_showed_on_another_route_is_refused_before_anything_is_asked():
    """Another tab moved chat from gpt-4o (5 credits) to o1 (20): a message sent from the page that
    still shows gpt-4o is refused (409), nothing asked, held or charged; sent with what the page shows
    once it has reloaded, it runs and is charged that."""
    service, _, outbox, provider = make(balance=100)
    await service.update_settings(ALICE, None, Provider.OPENAI, "gpt-4o", False, None)
    line = (await service.view(ALICE, None)).as_dict()["features"]["chat"]
    shown = (line["key_source"], line["model"], line["credits"])
    assert shown == ("platform", "gpt-4o", 5)
    await service.update_settings(ALICE, None, Provider.OPENAI, "o1", False, None)
    with pytest.raises(SettingsChanged) as exc:
        await service.calls.start(ALICE, None, page_request(Feature.CHAT, "hello", shown))
    assert exc.value.status == 409 and exc.value.details["route"]["model"] == "o1"
    assert (
        "o1 on platform credits, 20 credits" in exc.value.message and "Nothing was sent or charged" in exc.value.message
    )
    assert provider.calls == [] and outbox.events == []
    # BYOK switched on elsewhere: the page that still shows platform credits is refused too.
    ring = await byok_on(service, Provider.OPENAI, "o1")
    with pytest.raises(SettingsChanged, match="o1 on your OpenAI key, no credits"):
        await service.calls.start(ALICE, ring, page_request(Feature.CHAT, "hello", ("platform", "o1", 20)))
    started = await service.calls.start(ALICE, ring, page_request(Feature.CHAT, "hello", ("byok", "o1", 0)))
    outcome = started if isinstance(started, Outcome) else await started.result()
    assert outcome.ok and outcome.body["billing"]["decision"] == "not_billed_byok" and len(provider.calls) == 1


async def test_provider_error_on_the_users_key_is_worded_like_the_check_and_marks_the_key():
    service, store, outbox, provider = make()
    key = await byok_on(service)
    message = "This OpenAI key has been revoked or has expired. Create a new key."
    provider.error = ProviderError(Provider.OPENAI, KeyVerdict(KeyCheckStatus.REVOKED_OR_EXPIRED, message), 401)
    with pytest.raises(ProviderFailed) as exc:
        await service.call(ALICE, key, Feature.CHAT, "hello")
    assert exc.value.message == message and exc.value.details["key_status"] == "revoked_or_expired"
    assert exc.value.details["billing"]["charged"] is False
    view = (await service.view(ALICE, key)).as_dict()
    assert view["key_status"] == "revoked_or_expired" and view["key_message"] == message
    assert view["key_in_session"] is False and view["features"]["chat"]["runs_on"] == "paused"
    [event] = outbox.events
    assert event.status is CallStatus.FAILED and event.key_source is KeySource.BYOK


async def test_a_later_success_marks_the_key_valid_again():
    service, store, _, provider = make()
    key = await byok_on(service)
    provider.error = ProviderError(Provider.OPENAI, KeyVerdict(KeyCheckStatus.RATE_LIMITED, "wait"), 429)
    with pytest.raises(ProviderFailed):
        await service.call(ALICE, key, Feature.CHAT, "hello")
    provider.error = None
    assert (await service.view(ALICE, key)).as_dict()["key_status"] == "rate_limited"  # still usable
    await service.call(ALICE, key, Feature.CHAT, "hello")
    assert (await service.view(ALICE, key)).as_dict()["key_status"] == "valid"


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
    change = await service.update_settings(
        ALICE, None, Provider.GROQ, "llama3-8b-8192", True, "gsk_revoked000000000000001"
    )
    assert not change.accepted and change.keep_key is None and not change.discard_key
    assert change.check.status is KeyCheckStatus.REVOKED_OR_EXPIRED
    assert await store.get("alice") == before


async def test_switching_byok_off_revokes_every_key_on_the_server_and_says_so():
    service, store, _, provider = make()
    ring = await byok_on(service)
    ring = await byok_on(service, Provider.GROQ, "llama3-8b-8192", ring=ring, key="gsk_" + "g" * 30)
    change = await service.update_settings(ALICE, ring, Provider.OPENAI, "gpt-4o", False, None)
    assert change.accepted and change.discard_key
    assert "OpenAI sk-proj-…0001" in change.message and "Groq" in change.message and "removed" in change.message
    assert await store.get("alice") == ModelSettings("alice", Provider.OPENAI, "gpt-4o")
    # A saved copy of the cookie opens nothing any more, even with BYOK switched on again.
    await service.update_settings(ALICE, ring, Provider.OPENAI, "gpt-4o", True, None)
    assert (await service.view(ALICE, ring)).keys == {}
    with pytest.raises(OwnKeyMissing):
        await service.call(ALICE, ring, Feature.CHAT, "hello")
    assert all(call[1] != USER_KEY for call in provider.calls)


async def test_byok_without_a_key_in_the_session_is_refused_not_silently_billed():
    service, _, outbox, provider = make()
    ring = await byok_on(service)
    with pytest.raises(OwnKeyMissing) as exc:
        await service.call(ALICE, None, Feature.CHAT, "hello")  # the cookie expired or was dropped
    assert "no OpenAI key" in exc.value.message and "nothing is charged" in exc.value.message
    # A key the server never recorded (forged id, or another server's) is no key either.
    with pytest.raises(OwnKeyMissing):
        await service.call(ALICE, {Provider.OPENAI: session_key()}, Feature.CHAT, "hello")
    assert provider.calls[1:] == [] and outbox.events == []
    view = (await service.view(ALICE, None)).as_dict()
    assert view["byok"] and view["key_status"] == "missing" and not view["key_in_session"]
    assert view["features"]["chat"]["runs_on"] == "paused"
    assert (await service.view(ALICE, ring)).as_dict()["features"]["chat"]["runs_on"] == "your_key"


async def test_a_key_is_bound_to_its_provider():
    """Finding 2: an OpenAI key never runs a call the settings say goes to Anthropic."""
    checker = FakeChecker()
    service, _, outbox, provider = make(checker=checker)
    ring = await byok_on(service)
    change = await service.update_settings(ALICE, ring, Provider.ANTHROPIC, "claude-sonnet-4", True, None)
    assert change.accepted and change.keep_key is None and len(checker.calls) == 1
    view = (await service.view(ALICE, ring)).as_dict()
    assert view["provider"] == "anthropic" and view["key_hint"] is None and view["key_status"] == "missing"
    assert [k["provider"] for k in view["keys"]] == ["openai"]  # the OpenAI key is listed as OpenAI's
    with pytest.raises(OwnKeyMissing) as exc:
        await service.call(ALICE, ring, Feature.CHAT, "hello")
    assert "no Anthropic key" in exc.value.message
    # Nor does a cookie entry that claims another provider than the server recorded for its id.
    forged = {Provider.ANTHROPIC: replace(ring[Provider.OPENAI], provider=Provider.ANTHROPIC)}
    with pytest.raises(OwnKeyMissing):
        await service.call(ALICE, forged, Feature.CHAT, "hello")
    assert len(provider.calls) == 0 and outbox.events == []


async def test_switching_byok_on_without_a_key_is_kept_and_pauses_chat():
    """Finding 1: the switch says BYOK, so chat never runs on credits behind it."""
    service, store, outbox, provider = make(checker=FakeChecker(KeyCheckStatus.REVOKED_OR_EXPIRED))
    change = await service.update_settings(ALICE, None, Provider.OPENAI, "gpt-4o-mini", True, None)
    assert change.accepted and (await store.get("alice")).use_own_key
    assert "Paste your OpenAI key" in change.message
    refused = await service.update_settings(
        ALICE, None, Provider.OPENAI, "gpt-4o-mini", True, "sk-proj-revoked" + "r" * 20
    )
    assert not refused.accepted and refused.keep_key is None
    with pytest.raises(OwnKeyMissing):
        await service.call(ALICE, None, Feature.CHAT, "hello")
    assert provider.calls == [] and outbox.events == []


async def test_a_key_whose_last_check_failed_is_not_used():
    service, store, outbox, provider = make()
    ring = await byok_on(service)
    await store.mark_key(ring[Provider.OPENAI].key_id, "revoked_or_expired", "This key was revoked.")
    with pytest.raises(OwnKeyMissing) as exc:
        await service.call(ALICE, ring, Feature.CHAT, "hello")
    assert "failed its last check (revoked or expired)" in exc.value.message
    assert exc.value.details["key_status"] == "revoked_or_expired"
    assert provider.calls == [] and outbox.events == []


async def test_fallback_to_platform_is_off_by_default_and_when_chosen_says_so_and_shows_the_charge():
    service, store, outbox, provider = make(balance=100)
    await service.update_settings(ALICE, None, Provider.OPENAI, "gpt-4o-mini", True, None)
    assert (await store.get("alice")).fallback_to_platform is False
    await service.update_settings(ALICE, None, Provider.OPENAI, "gpt-4o-mini", True, None, fallback_to_platform=True)
    view = (await service.view(ALICE, None)).as_dict()
    assert view["fallback_to_platform"] and view["features"]["chat"] == {
        "runs_on": "platform",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "key_source": "platform",
        "credits": 3,
        "fallback": True,
        "message": view["features"]["chat"]["message"],
    }
    assert "falls back to platform credits" in view["features"]["chat"]["message"]
    result = await service.call(ALICE, None, Feature.CHAT, "hello")
    assert result.fallback and result.event.key_source is KeySource.PLATFORM and provider.calls[-1][1] == PLATFORM_KEY
    assert result.billing.credits == 3 and "3 credits charged" in result.notice and "no OpenAI key" in result.notice
    # A later settings change without the field keeps the choice.
    await service.update_settings(ALICE, None, Provider.OPENAI, "gpt-4o", True, None)
    assert (await store.get("alice")).fallback_to_platform is True
    # With a usable key, the key is used and nothing falls back.
    ring = await byok_on(service)
    result = await service.call(ALICE, ring, Feature.CHAT, "hello")
    assert not result.fallback and result.notice is None and result.billing.credits == 0


async def test_keeping_byok_while_changing_model_needs_no_new_check():
    checker = FakeChecker()
    service, store, _, _ = make(checker=checker)
    key = await byok_on(service)
    change = await service.update_settings(ALICE, key, Provider.OPENAI, "gpt-4.1", True, None)
    assert change.accepted and change.keep_key is None and len(checker.calls) == 1
    assert (await store.get("alice")).model == "gpt-4.1"
    assert "your OpenAI key" in change.message


async def test_one_key_per_provider_and_a_new_key_replaces_the_old_one():
    service, store, _, provider = make()
    ring = await byok_on(service)
    ring = await byok_on(service, Provider.GROQ, "llama3-8b-8192", ring=ring, key="gsk_" + "g" * 30)
    assert sorted(k["provider"] for k in (await service.view(ALICE, ring)).as_dict()["keys"]) == ["groq", "openai"]
    await service.call(ALICE, ring, Feature.CHAT, "hello")
    assert provider.calls[-1] == (Provider.GROQ, "gsk_" + "g" * 30, "llama3-8b-8192")
    old = ring
    ring = await byok_on(service, Provider.OPENAI, "gpt-4o", ring=ring, key="sk-proj-second" + "2" * 20)
    assert (await service.view(ALICE, old)).keys.keys() == {Provider.GROQ}  # the old OpenAI key is revoked
    await service.call(ALICE, ring, Feature.CHAT, "hello")
    assert provider.calls[-1][1] == "sk-proj-second" + "2" * 20


async def test_a_refused_new_key_keeps_the_earlier_one_and_says_so():
    checker = FakeChecker()
    service, _, _, provider = make(checker=checker)
    ring = await byok_on(service)
    checker.status = KeyCheckStatus.INVALID
    change = await service.update_settings(ALICE, ring, Provider.OPENAI, "gpt-4o", True, "sk-proj-typo" + "t" * 20)
    assert not change.accepted and "earlier OpenAI key sk-proj-…0001 is still the one in use" in change.message
    await service.call(ALICE, ring, Feature.CHAT, "hello")
    assert provider.calls[-1][1] == USER_KEY


async def test_removing_a_key_and_signing_out_revoke_it_on_the_server():
    service, _, _, _ = make()
    ring = await byok_on(service)
    ring = await byok_on(service, Provider.GROQ, "llama3-8b-8192", ring=ring, key="gsk_" + "g" * 30)
    assert await service.remove_key(ALICE, Provider.GROQ) == 1
    assert (await service.view(ALICE, ring)).keys.keys() == {Provider.OPENAI}
    assert await service.remove_key(ALICE, Provider.GROQ) == 0
    # Another session of the same user keeps its keys when this one signs out.
    other = Identity("alice", "user", "sess-2", "token-b")
    other_ring = await byok_on(service, who=other)
    assert await service.sign_out(ALICE) == 1
    assert (await service.view(ALICE, ring)).keys == {}
    assert (await service.view(other, other_ring)).keys.keys() == {Provider.OPENAI}
    # A ring from one session is no key in another.
    assert (await service.view(other, ring)).keys == {}


async def test_always_platform_features_run_on_the_configured_model_never_the_users():
    service, _, _, provider = make(balance=1000)
    service.router.feature_models[Feature.CODE_FIX] = (Provider.ANTHROPIC, "claude-3-5-haiku")
    ring = await byok_on(service, Provider.GROQ, "llama3-8b-8192", key="gsk_" + "g" * 30)
    result = await service.call(ALICE, ring, Feature.CODE_FIX, "fix")
    assert provider.calls[-1] == (Provider.ANTHROPIC, PLATFORM_KEY, "claude-3-5-haiku")
    assert result.event.model == "claude-3-5-haiku" and result.billing.credits == 1
    result = await service.call(ALICE, ring, Feature.DEEP_ANALYSIS, "deep")
    assert provider.calls[-1] == (Provider.OPENAI, PLATFORM_KEY, "gpt-4.1") and result.billing.credits == 50
    features = (await service.view(ALICE, ring)).as_dict()["features"]
    assert features["deep_analysis"]["credits"] == 50 and features["deep_analysis"]["model"] == "gpt-4.1"
    assert features["code_fix"]["runs_on"] == "platform" and features["chat"]["runs_on"] == "your_key"


async def test_checker_timeout_answers_provider_unavailable_and_keeps_settings():
    class SlowChecker:
        async def check(self, *args):
            raise TimeoutError

    service, store, _, _ = make(checker=SlowChecker())
    change = await service.update_settings(ALICE, None, Provider.OPENAI, "gpt-4o", True, USER_KEY)
    assert not change.accepted and change.check.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert await store.get("alice") is None


async def test_unknown_balance_pauses_platform_calls_but_not_byok_chat():
    class DownCredits(MemoryCredits):
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

    async def call_model(*args, **kw):
        seen["funds"] = await service.balances.funds(ALICE)  # while the provider works
        return await real_call(*args, **kw)

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

    async def slow_call(*args, **kw):
        await gate.wait()
        return await real_call(*args, **kw)

    service.call_model = slow_call
    calls = [asyncio.ensure_future(service.call(ALICE, None, Feature.CHAT, "hi")) for _ in range(6)]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    served = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, PaymentRequired)]
    assert len(served) == 3 and len(refused) == 3  # 3 x 3 credits fit in 10, a fourth does not
    assert (
        refused[0].details["available"] == 1
        and "1 available (9 more are held by calls still running)" in refused[0].message
    )
    assert len(outbox.events) == 3  # the refused calls left no event behind


async def test_a_hold_is_released_when_the_provider_is_never_asked():
    service, _, outbox, provider = make(balance=10)

    async def broken_claim(*args):
        raise ConnectionError("database away")

    outbox.claim = broken_claim
    with pytest.raises(ConnectionError):
        await service.call(ALICE, None, Feature.CHAT, "hello")
    assert service.balances.holds == {} and provider.calls == []


async def test_a_hold_whose_answer_was_lost_is_released_now_and_once_more_later():
    """The credit service placed the hold, but its answer never came back (timeout), or the placement
    lands after the chat gave up: the call is refused (503) and the hold is released, then released
    again a moment later; and the call's event is published as failed (`not_started`), whose decision
    releases the hold whatever happened to both releases."""

    class LostAnswer(MemoryCredits):
        placed: list = []
        releases = 0

        async def reserve(self, who, event_id, feature, provider, model):
            self.placed.append(await super().reserve(who, event_id, feature, provider, model))
            raise CreditsUnavailable("the credit service did not answer (TimeoutError)")  # answer lost

        async def release(self, who, event_id):
            LostAnswer.releases += 1
            await super().release(who, event_id)

    service, _, outbox, provider = make(balance=50)
    service.balances = credits = LostAnswer({"alice": 50})
    service.release_again_s = 0.05
    with pytest.raises(BalanceUnknown):
        await service.call(ALICE, None, Feature.DEEP_ANALYSIS, "everything")
    [event] = outbox.events
    assert provider.calls == [] and event.status is CallStatus.FAILED and event.ending is Ending.NOT_STARTED
    assert outbox.rows[1][1] is True  # ready to publish
    await asyncio.sleep(0)  # the first release runs as soon as the refusal is out
    assert credits.holds == {} and LostAnswer.releases == 1
    # A placement the credit service had queued lands after the first release...
    [hold] = credits.placed
    credits.holds[hold.event_id] = ("alice", hold.credits)
    assert (await credits.funds(ALICE)).available == 0
    await asyncio.sleep(0.1)
    assert LostAnswer.releases == 2 and credits.holds == {}  # ...and the second release takes it away
    assert (await credits.funds(ALICE)).available == 50


async def test_a_gateway_call_with_its_own_key_reads_no_settings_and_runs_on_that_key():
    """X-Provider-Key decides the route whatever the settings say (Router.route_for_model): the plan reads
    nothing for it, while a gateway call without a key, and any other feature, read the user's settings
    (BYOK switched on without a session key refuses the keyless one)."""
    calling, store, _, _ = make()
    reads = []
    real_load = store.load

    async def load(user_id, session_id, key_ids):
        reads.append(user_id)
        return await real_load(user_id, session_id, key_ids)

    store.load = load
    await store.put(ModelSettings("alice", Provider.OPENAI, "gpt-4o", True))  # BYOK on, no key in the session
    own = CallRequest(Feature.CHAT, [{"role": "user", "content": "hi"}], model="gpt-4o-mini", own_key=USER_KEY)
    route, api_key = await calling.service.plan(ALICE, None, own)
    assert (route.key_source, route.provider, route.model, api_key) == (
        KeySource.BYOK,
        Provider.OPENAI,
        "gpt-4o-mini",
        USER_KEY,
    )
    assert reads == []
    with pytest.raises(OwnKeyMissing):
        await calling.service.plan(ALICE, None, replace(own, own_key=None))
    assert reads == ["alice"]
    route, _ = await calling.service.plan(ALICE, None, replace(own, feature=Feature.DEEP_ANALYSIS))
    assert route.key_source is KeySource.PLATFORM and reads == ["alice", "alice"]
