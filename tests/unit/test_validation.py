"""Validation worker parts without Kafka: sealing, checks against the simulator, cache, limit, handler."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import httpx
import pytest

from providers import KeyVerdict
from schemas.events import KeyCheckRequest, KeyCheckResult, KeyCheckStatus, Provider
from services.provider_simulator import SimulatorServer, SimulatorState, base_urls, build_app
from services.shared.provider_http import ProviderClient
from services.shared.sealing import DEV_KEY_ID, KeyOpener, KeySealer, SealingError, SealingSettings, generate
from services.validation.checks import KeyChecker
from services.validation.guards import UserRateLimit, VerdictCache, too_many_checks
from services.validation.handler import RequestHandler
from services.validation.service import KeyCheckService
from services.validation.settings import ValidationSettings
from tests.support import BEHAVIOUR_STATUS, sim_key as key

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- sealing ----------------------------------------------------------------------------------


def two_key_pairs():
    old, new = generate("old"), generate("new")
    public = {**json.loads(old["KEY_SEAL_PUBLIC_KEYS"]), **json.loads(new["KEY_SEAL_PUBLIC_KEYS"])}
    private = {**json.loads(old["KEY_SEAL_PRIVATE_KEYS"]), **json.loads(new["KEY_SEAL_PRIVATE_KEYS"])}
    return public, private


def test_sealed_key_opens_only_with_the_private_key_and_holds_no_plaintext():
    public, private = two_key_pairs()
    api_key = "sk-proj-secretsecretsecret-a1b2"
    sealed = KeySealer(public, "new").seal(api_key)
    assert sealed.key_id == "new"
    assert api_key not in sealed.sealed_key and "secretsecret" not in sealed.sealed_key
    assert KeyOpener(private).open("new", sealed.sealed_key) == api_key
    # A sealed box is randomised: the same key never gives the same ciphertext twice.
    assert KeySealer(public, "new").seal(api_key).sealed_key != sealed.sealed_key


def test_opener_holds_two_key_ids_for_rotation():
    public, private = two_key_pairs()
    opener = KeyOpener(private)
    for key_id in ("old", "new"):
        assert opener.open(key_id, KeySealer(public, key_id).seal("k" * 30).sealed_key) == "k" * 30


@pytest.mark.parametrize("mangle", ["unknown id", "wrong id", "tampered", "not base64"])
def test_a_sealed_key_that_does_not_open_is_a_clear_error(mangle):
    public, private = two_key_pairs()
    sealed = KeySealer(public, "old").seal("sk-" + "z" * 30)
    key_id, blob = sealed.key_id, sealed.sealed_key
    if mangle == "unknown id":
        key_id = "gone"
    elif mangle == "wrong id":
        key_id = "new"
    elif mangle == "tampered":
        blob = ("A" if blob[0] != "A" else "B") + blob[1:]
    else:
        blob = "%%%not-base64%%%"
    with pytest.raises(SealingError) as caught:
        KeyOpener(private).open(key_id, blob)
    assert "z" * 10 not in str(caught.value)


def test_sealing_settings_default_to_the_marked_dev_pair_and_read_json_env(monkeypatch):
    for name in ("KEY_SEAL_CURRENT_KEY_ID", "KEY_SEAL_PUBLIC_KEYS", "KEY_SEAL_PRIVATE_KEYS"):
        monkeypatch.delenv(name, raising=False)
    default = SealingSettings()
    assert default.current_key_id == DEV_KEY_ID and default.uses_dev_key
    sealed = KeySealer.from_settings(default).seal("sk-" + "q" * 30)
    assert KeyOpener.from_settings(default).open(sealed.key_id, sealed.sealed_key) == "sk-" + "q" * 30

    for name, value in generate("prod-2026").items():
        monkeypatch.setenv(name, value)
    configured = SealingSettings()
    assert configured.current_key_id == "prod-2026" and not configured.uses_dev_key
    assert "prod-2026" not in repr(configured.private_keys["prod-2026"])  # SecretStr hides it

    monkeypatch.setenv("KEY_SEAL_CURRENT_KEY_ID", "missing")
    with pytest.raises(ValueError, match="not in KEY_SEAL_PUBLIC_KEYS"):
        SealingSettings()


# --- provider checks against the simulator -----------------------------------------------------


@pytest.fixture
def sim():
    state = SimulatorState()
    settings = ValidationSettings(**{k.lower(): v for k, v in base_urls("http://sim").items()})
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(state)), base_url="http://sim")
    return state, settings, client


@pytest.mark.parametrize("provider", list(Provider))
@pytest.mark.parametrize("behaviour", list(BEHAVIOUR_STATUS))
async def test_every_status_for_every_provider(sim, provider, behaviour):
    state, settings, client = sim
    api_key = key(provider, behaviour)
    async with client:
        verdict = await KeyChecker(settings, client).check(provider, api_key)
    assert verdict.status is BEHAVIOUR_STATUS[behaviour]
    assert api_key not in verdict.message and verdict.message.endswith(".")
    assert state.calls(api_key) == 1  # exactly one call, no retries
    if verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE:
        assert "try again" in verdict.message


@pytest.mark.parametrize("provider", list(Provider))
async def test_malformed_keys_make_no_network_call(sim, provider):
    state, settings, client = sim
    async with client:
        verdict = await KeyChecker(settings, client).check(provider, "not-a-key")
    assert verdict.status is KeyCheckStatus.MALFORMED
    assert state.total_calls() == 0


@pytest.mark.parametrize("provider", list(Provider))
async def test_timeout_and_network_failure_are_unavailable_never_invalid(provider):
    with SimulatorServer() as server:
        server.state.register(key(provider, "valid"), "slow", delay_ms=3000)
        settings = ValidationSettings(**{k.lower(): v for k, v in server.env().items()})
        async with ProviderClient(timeout_s=0.05) as client:
            slow = await KeyChecker(settings, client).check(provider, key(provider, "valid"))
        dead_url = server.base_url
    assert slow.status is KeyCheckStatus.PROVIDER_UNAVAILABLE and "in time" in slow.message
    # The server is gone now: nothing listens on its port.
    settings = ValidationSettings(**{k.lower(): v for k, v in base_urls(dead_url).items()})
    async with ProviderClient(timeout_s=2) as client:
        gone = await KeyChecker(settings, client).check(provider, key(provider, "valid"))
    assert gone.status is KeyCheckStatus.PROVIDER_UNAVAILABLE and "could not be reached" in gone.message


# --- cache and per-user limit -------------------------------------------------------------------


def test_cache_keeps_verdicts_on_the_key_for_its_ttl_only():
    clock = FakeClock()
    cache = VerdictCache(ttl_s=60, max_entries=2, clock=clock)
    fp = cache.fingerprint(Provider.OPENAI, "sk-" + "a" * 30)
    assert fp != cache.fingerprint(Provider.GROQ, "sk-" + "a" * 30)
    assert b"aaaaaaaa" not in fp
    cache.put(fp, KeyVerdict(KeyCheckStatus.VALID, "ok"))
    clock.now += 59
    assert cache.get(fp).status is KeyCheckStatus.VALID
    clock.now += 2
    assert cache.get(fp) is None
    for transient in (KeyCheckStatus.RATE_LIMITED, KeyCheckStatus.PROVIDER_UNAVAILABLE):
        cache.put(fp, KeyVerdict(transient, "later"))
        assert cache.get(fp) is None
    for i in range(3):
        cache.put(bytes([i]), KeyVerdict(KeyCheckStatus.INVALID, "no"))
    assert len(cache) == 2 and cache.get(bytes([0])) is None


def test_fingerprints_differ_between_processes():
    assert VerdictCache(60, 10).fingerprint(Provider.OPENAI, "k") != VerdictCache(60, 10).fingerprint(
        Provider.OPENAI, "k"
    )


def test_user_limit_is_a_sliding_minute_per_user():
    clock = FakeClock()
    limit = UserRateLimit(per_minute=3, clock=clock)
    assert [limit.acquire("alice") for _ in range(3)] == [None, None, None]
    wait = limit.acquire("alice")
    assert wait == pytest.approx(60)
    assert limit.acquire("bob") is None
    clock.now += 30
    assert limit.acquire("alice") == pytest.approx(30)
    clock.now += 30.5
    assert limit.acquire("alice") is None


def test_user_limit_counts_each_provider_apart_and_its_answer_names_the_provider():
    """Finding 8: ten OpenAI checks in a minute do not make the Groq check wait."""
    clock = FakeClock()
    limit = UserRateLimit(per_minute=2, clock=clock)
    assert [limit.acquire("alice", Provider.OPENAI) for _ in range(2)] == [None, None]
    assert limit.acquire("alice", Provider.OPENAI) == pytest.approx(60)
    assert limit.acquire("alice", Provider.GROQ) is None
    verdict = too_many_checks(42.2, Provider.OPENAI, 2)
    assert verdict.status is KeyCheckStatus.RATE_LIMITED
    assert "2 OpenAI keys" in verdict.message and "about 43 seconds" in verdict.message
    assert "other providers can be checked now" in verdict.message


class CountingChecker:
    def __init__(self, status=KeyCheckStatus.VALID):
        self.calls, self.status = 0, status

    async def check(self, provider, api_key):
        self.calls += 1
        return KeyVerdict(self.status, "checked.")


async def test_double_click_calls_the_provider_once():
    checker = CountingChecker()
    service = KeyCheckService(checker, VerdictCache(60, 100), UserRateLimit(10))
    first = await service.check("alice", Provider.OPENAI, "sk-" + "b" * 30)
    second = await service.check("alice", Provider.OPENAI, " sk-" + "b" * 30 + "\n")
    assert first == second and checker.calls == 1


async def test_too_many_new_keys_from_one_user_get_a_clear_rate_limited_answer():
    checker = CountingChecker(KeyCheckStatus.INVALID)
    service = KeyCheckService(checker, VerdictCache(60, 100), UserRateLimit(2))
    for i in range(2):
        assert (await service.check("mallory", Provider.GROQ, f"gsk_{i:030d}")).status is KeyCheckStatus.INVALID
    limited = await service.check("mallory", Provider.GROQ, "gsk_" + "9" * 30)
    assert limited.status is KeyCheckStatus.RATE_LIMITED and "Wait about" in limited.message
    assert checker.calls == 2
    # Cached and malformed answers cost no provider call, so they are not limited.
    assert (await service.check("mallory", Provider.GROQ, f"gsk_{0:030d}")).status is KeyCheckStatus.INVALID
    assert (await service.check("mallory", Provider.GROQ, "nope")).status is KeyCheckStatus.MALFORMED
    assert (await service.check("someone-else", Provider.GROQ, "gsk_" + "9" * 30)).status is KeyCheckStatus.INVALID


# --- the record handler -----------------------------------------------------------------------

REPLIES = "p.key_check_replies"


def record(value: bytes | None, headers=None, key=b"alice", offset=7):
    return SimpleNamespace(
        topic="p.key_check_requests",
        partition=1,
        offset=offset,
        key=key,
        value=value,
        headers=headers if headers is not None else [("reply_to", REPLIES.encode()), ("correlation_id", b"corr-1")],
    )


@pytest.fixture
def handler_parts():
    public, private = two_key_pairs()
    checker = CountingChecker()
    handler = RequestHandler(
        KeyCheckService(checker, VerdictCache(60, 10), UserRateLimit(10)), KeyOpener(private), REPLIES
    )
    return handler, KeySealer(public, "new"), checker


def request_bytes(sealer: KeySealer, api_key: str, **overrides) -> bytes:
    sealed = sealer.seal(api_key)
    fields = dict(
        request_id=uuid.uuid4(),
        user_id="alice",
        provider=Provider.OPENAI,
        sealed_key=sealed.sealed_key,
        key_id=sealed.key_id,
    )
    fields.update(overrides)
    return KeyCheckRequest(**fields).to_json()


async def test_a_request_is_answered_on_reply_to_with_the_correlation_id(handler_parts, caplog):
    handler, sealer, checker = handler_parts
    api_key = "sk-proj-verysecretvalue-0000c0de"
    caplog.set_level(logging.DEBUG)
    outcome = await handler.handle(record(request_bytes(sealer, api_key)))
    assert outcome.dead_letter is None
    assert outcome.reply.topic == REPLIES and outcome.reply.headers == [("correlation_id", b"corr-1")]
    assert outcome.reply.key == b"alice"
    result = KeyCheckResult.from_json(outcome.reply.value)
    assert result.status is KeyCheckStatus.VALID and result.key_hint == "sk-proj-…c0de"
    assert b"verysecret" not in outcome.reply.value
    assert "verysecret" not in caplog.text and "sk-proj-…c0de" in caplog.text


@pytest.mark.parametrize(
    "value,reason",
    [
        (b"{not json", "invalid_request"),
        (b'{"request_id": "x"}', "invalid_request"),
        (None, "bad_size"),
        (b"x" * (64 * 1024 + 1), "bad_size"),
    ],
)
async def test_poison_requests_are_dead_lettered_with_the_reason(handler_parts, value, reason):
    handler, _, checker = handler_parts
    outcome = await handler.handle(record(value))
    assert outcome.reply is None
    assert outcome.dead_letter.error_type == reason and outcome.dead_letter.value == value
    headers = dict(outcome.dead_letter.headers())
    assert headers["dlq.error_type"] == reason.encode() and headers["dlq.source_offset"] == b"7"
    assert checker.calls == 0


async def test_a_request_whose_key_does_not_open_is_dead_lettered_and_answered_try_again(handler_parts):
    handler, sealer, _ = handler_parts
    outcome = await handler.handle(record(request_bytes(sealer, "sk-" + "c" * 30, key_id="retired")))
    assert outcome.dead_letter.error_type == "cannot_open"
    assert KeyCheckResult.from_json(outcome.reply.value).status is KeyCheckStatus.PROVIDER_UNAVAILABLE


async def test_an_invalid_request_with_a_readable_id_still_gets_an_answer(handler_parts):
    handler, _, _ = handler_parts
    request_id = uuid.uuid4()
    value = json.dumps({"request_id": str(request_id), "provider": "gemini", "user_id": ""}).encode()
    outcome = await handler.handle(record(value))
    assert outcome.dead_letter.error_type == "invalid_request" and "user_id" in outcome.dead_letter.error
    reply = KeyCheckResult.from_json(outcome.reply.value)
    assert reply.request_id == request_id and reply.status is KeyCheckStatus.PROVIDER_UNAVAILABLE


async def test_replies_only_go_to_replies_topics(handler_parts):
    handler, sealer, checker = handler_parts
    outcome = await handler.handle(
        record(
            request_bytes(sealer, "sk-" + "d" * 30),
            headers=[("reply_to", b"model_call_completed"), ("correlation_id", b"c")],
        )
    )
    assert outcome.reply is None and outcome.dead_letter.error_type == "reply_to_not_allowed"
    assert checker.calls == 0
    own = await handler.handle(
        record(request_bytes(sealer, "sk-" + "d" * 30), headers=[("reply_to", (REPLIES + ".chat-7").encode())])
    )
    assert own.reply.topic == REPLIES + ".chat-7"
    # Without headers: the default replies topic, correlated by the request id.
    default = await handler.handle(record(request_bytes(sealer, "sk-" + "d" * 30), headers=[]))
    assert default.reply.topic == REPLIES
    assert default.reply.headers[0][1].decode() == str(KeyCheckResult.from_json(default.reply.value).request_id)


async def test_a_stale_request_is_answered_without_a_provider_call(handler_parts):
    handler, sealer, checker = handler_parts
    old = datetime.now(timezone.utc) - timedelta(minutes=10)
    outcome = await handler.handle(record(request_bytes(sealer, "sk-" + "e" * 30, requested_at=old)))
    assert KeyCheckResult.from_json(outcome.reply.value).status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert checker.calls == 0


async def test_a_failing_check_is_dead_lettered_not_raised(handler_parts):
    handler, sealer, _ = handler_parts

    class Broken:
        async def check(self, provider, api_key):
            raise RuntimeError("bug")

    handler.service.checker = Broken()
    outcome = await handler.handle(record(request_bytes(sealer, "sk-" + "f" * 30)))
    assert outcome.dead_letter.error_type == "internal_error"
    assert KeyCheckResult.from_json(outcome.reply.value).status is KeyCheckStatus.PROVIDER_UNAVAILABLE


def test_commit_point_is_the_oldest_unanswered_offset():
    from services.validation.worker import PartitionProgress

    progress = PartitionProgress()
    assert progress.commit_point() is None
    for offset in (10, 11, 12):
        progress.take(offset)
    progress.done(11)
    progress.done(12)
    assert progress.commit_point() == 10  # 10 is still being checked: a crash must re-answer it
    progress.done(10)
    assert progress.commit_point() == 13
    progress.committed = 13
    assert progress.commit_point() is None  # nothing new to commit


class FakeProducer:
    """Accepts sends except to `broken_topics`, whose sends fail like a missing topic."""

    def __init__(self, broken_topics=()):
        self.broken, self.sent = set(broken_topics), []

    async def send(self, topic, value=None, key=None, headers=None):
        if topic in self.broken:
            raise RuntimeError("unknown topic")
        self.sent.append((topic, value, dict(headers or [])))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_a_reply_that_cannot_be_sent_is_dead_lettered_and_the_offset_released(handler_parts):
    from aiokafka import TopicPartition

    from services.validation.worker import PartitionProgress, ValidationWorker

    handler, sealer, _ = handler_parts
    worker = ValidationWorker(ValidationSettings(reply_attempts=2), handler)
    worker.producer = FakeProducer(broken_topics={REPLIES + ".gone"})
    tp = TopicPartition("p.key_check_requests", 1)
    worker._progress[tp] = progress = PartitionProgress()
    progress.take(7)
    value = request_bytes(sealer, "sk-" + "g" * 30)
    await worker._answer(tp, record(value, headers=[("reply_to", (REPLIES + ".gone").encode())]))
    [(topic, sent_value, headers)] = worker.producer.sent
    assert topic == "p.key_check_requests.dlq" and sent_value == value
    assert headers["dlq.error_type"] == b"reply_failed"
    assert progress.commit_point() == 8
