"""Key checks over the real broker: requester -> key_check_requests -> worker -> simulator -> reply."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.events import KeyCheckStatus, Provider
from services.chat.key_check_client import KeyCheckRequester
from services.provider_simulator import SimulatorServer
from services.shared.sealing import KeySealer, SealingSettings, generate
from services.shared.settings import CommonSettings
from services.validation.bootstrap import build
from services.validation.settings import ValidationSettings
from tests.support import BEHAVIOUR_STATUS, sim_key as key

pytestmark = pytest.mark.integration

HINTS = {
    Provider.OPENAI: "sk-proj-…a1b2",
    Provider.GROQ: "gsk_…a1b2",
    Provider.ANTHROPIC: "sk-ant-…a1b2",
    Provider.GEMINI: "AIza…a1b2",
}


@pytest.fixture
def sim():
    with SimulatorServer() as server:
        yield server


def worker_settings(bootstrap: str, prefix: str, sim: SimulatorServer, **overrides) -> ValidationSettings:
    return ValidationSettings(
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        session_timeout_ms=6000,
        **{k.lower(): v for k, v in sim.env().items()},
        **overrides,
    )


async def start_worker(settings: ValidationSettings, sealing: SealingSettings | None = None):
    validation = build(settings, sealing)
    await validation.start()
    return validation


@pytest.fixture
async def worker(kafka_bootstrap, kafka_topics, sim):
    validation = await start_worker(worker_settings(kafka_bootstrap, kafka_topics, sim))
    yield validation
    await validation.stop()


@pytest.fixture
async def requester(kafka_bootstrap, kafka_topics):
    async with KeyCheckRequester(
        CommonSettings(kafka_bootstrap_servers=kafka_bootstrap, topic_prefix=kafka_topics), timeout_s=30
    ) as r:
        yield r


async def read_topic(bootstrap: str, topic: str, want: int, timeout_s: float = 20) -> list:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < want and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def test_every_status_for_every_provider_over_the_broker(worker, requester, sim):
    for provider in Provider:
        for behaviour, status in BEHAVIOUR_STATUS.items():
            result = await requester.check(f"user-{provider.value}-{behaviour}", provider, key(provider, behaviour))
            assert (provider, behaviour, result.status) == (provider, behaviour, status)
            assert result.key_hint == HINTS[provider] and result.provider is provider
            assert key(provider, behaviour) not in result.message
        malformed = await requester.check("user-x", provider, "pasted the wrong thing")
        assert malformed.status is KeyCheckStatus.MALFORMED
    assert sim.state.total_calls() == len(Provider) * len(BEHAVIOUR_STATUS)  # none for malformed keys


async def test_a_double_click_reaches_the_provider_once(worker, requester, sim):
    api_key = key(Provider.ANTHROPIC, "valid")
    first = await requester.check("alice", "anthropic", api_key)
    second = await requester.check("alice", "anthropic", api_key)
    assert first.status is second.status is KeyCheckStatus.VALID
    assert first.request_id != second.request_id
    assert sim.state.calls(api_key) == 1


async def test_a_user_checking_many_keys_is_limited_with_a_clear_answer(kafka_bootstrap, kafka_topics, sim, requester):
    validation = await start_worker(worker_settings(kafka_bootstrap, kafka_topics, sim, user_checks_per_minute=2))
    try:
        statuses = [(await requester.check("mallory", "groq", f"gsk_invalid{i:020d}")).status for i in range(3)]
        limited = await requester.check("mallory", "groq", "gsk_invalid" + "8" * 20)
        other = await requester.check("alice", "groq", "gsk_invalid" + "7" * 20)
        other_provider = await requester.check("mallory", "openai", "sk-proj-invalid" + "9" * 20)
    finally:
        await validation.stop()
    assert statuses == [KeyCheckStatus.INVALID, KeyCheckStatus.INVALID, KeyCheckStatus.RATE_LIMITED]
    assert "2 Groq keys" in limited.message and "other providers can be checked now" in limited.message
    # The limit is per user and per provider: neither another user nor another provider waits.
    assert other.status is KeyCheckStatus.INVALID and other_provider.status is KeyCheckStatus.INVALID


async def test_poison_requests_go_to_the_dlq_and_the_worker_carries_on(
    worker, requester, kafka_bootstrap, kafka_topics
):
    requests_topic = kafka_topics + "key_check_requests"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        poison = [b"\x00\xffnot json", json.dumps({"request_id": "nope"}).encode(), b"[]"]
        for value in poison:
            await producer.send_and_wait(
                requests_topic,
                value,
                key=b"mallory",
                headers=[("reply_to", (kafka_topics + "key_check_replies").encode()), ("correlation_id", b"x")],
            )
        await producer.send_and_wait(requests_topic, b"{}", key=b"m", headers=[("reply_to", b"model_call_completed")])
    finally:
        await producer.stop()
    result = await requester.check("alice", "gemini", key(Provider.GEMINI, "valid"))
    assert result.status is KeyCheckStatus.VALID
    dead = await read_topic(kafka_bootstrap, requests_topic + ".dlq", want=4)
    assert sorted(r.value for r in dead) == sorted(poison + [b"{}"])
    reasons = sorted(dict(r.headers)["dlq.error_type"].decode() for r in dead)
    assert reasons == ["invalid_request"] * 3 + ["reply_to_not_allowed"]
    assert all(dict(r.headers)["dlq.source_topic"] == requests_topic.encode() for r in dead)


async def test_without_a_worker_the_requester_times_out_with_try_again(requester):
    result = await requester.check("alice", "openai", key(Provider.OPENAI, "valid"), timeout_s=0.5)
    assert result.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert "try again" in result.message and result.key_hint == HINTS[Provider.OPENAI]


async def test_requests_sealed_to_either_key_id_are_answered_during_rotation(kafka_bootstrap, kafka_topics, sim):
    old, new = generate("old"), generate("new")
    worker_sealing = SealingSettings(
        current_key_id="new",
        public_keys={**json.loads(old["KEY_SEAL_PUBLIC_KEYS"]), **json.loads(new["KEY_SEAL_PUBLIC_KEYS"])},
        private_keys={**json.loads(old["KEY_SEAL_PRIVATE_KEYS"]), **json.loads(new["KEY_SEAL_PRIVATE_KEYS"])},
    )
    common = CommonSettings(kafka_bootstrap_servers=kafka_bootstrap, topic_prefix=kafka_topics)
    validation = await start_worker(worker_settings(kafka_bootstrap, kafka_topics, sim), worker_sealing)
    try:
        for key_id, env in (("old", old), ("new", new)):
            sealer = KeySealer(json.loads(env["KEY_SEAL_PUBLIC_KEYS"]), key_id)
            async with KeyCheckRequester(common, sealer, timeout_s=30) as requester:
                result = await requester.check("alice", "openai", key(Provider.OPENAI, "valid"))
            assert result.status is KeyCheckStatus.VALID, key_id
        stranger = KeySealer(json.loads(generate("other")["KEY_SEAL_PUBLIC_KEYS"]), "other")
        async with KeyCheckRequester(common, stranger, timeout_s=30) as requester:
            refused = await requester.check("alice", "openai", key(Provider.OPENAI, "valid"))
        assert refused.status is KeyCheckStatus.PROVIDER_UNAVAILABLE and "our side" in refused.message
    finally:
        await validation.stop()


async def test_two_chat_instances_share_the_replies_topic(worker, kafka_bootstrap, kafka_topics):
    common = CommonSettings(kafka_bootstrap_servers=kafka_bootstrap, topic_prefix=kafka_topics)
    async with KeyCheckRequester(common, timeout_s=30) as a, KeyCheckRequester(common, timeout_s=30) as b:
        jobs = [a.check(f"a{i}", "openai", key(Provider.OPENAI, "valid")) for i in range(10)]
        jobs += [b.check(f"b{i}", "groq", key(Provider.GROQ, "revoked")) for i in range(10)]
        results = await asyncio.gather(*jobs)
    assert [r.status for r in results] == [KeyCheckStatus.VALID] * 10 + [KeyCheckStatus.REVOKED_OR_EXPIRED] * 10
    assert len({r.request_id for r in results}) == 20


async def test_a_slow_provider_does_not_hold_up_other_checks(worker, requester, sim):
    sim.state.register(key(Provider.ANTHROPIC, "valid"), "slow", delay_ms=4000)
    slow = asyncio.create_task(requester.check("slowpoke", "anthropic", key(Provider.ANTHROPIC, "valid")))
    await asyncio.sleep(0.2)  # let the slow one reach the worker first
    fast = await asyncio.gather(*(requester.check(f"u{i}", "openai", key(Provider.OPENAI, "valid")) for i in range(5)))
    assert all(r.status is KeyCheckStatus.VALID for r in fast)
    assert not slow.done()  # the fast ones overtook it
    assert (await slow).status is KeyCheckStatus.VALID


async def test_a_graceful_stop_answers_and_commits_what_the_worker_took(kafka_bootstrap, kafka_topics, sim, requester):
    slow_key = key(Provider.OPENAI, "valid")
    sim.state.register(slow_key, "slow", delay_ms=1500)
    settings = worker_settings(kafka_bootstrap, kafka_topics, sim)
    first = await start_worker(settings)
    checks = [asyncio.create_task(requester.check(f"g{i}", "openai", slow_key)) for i in range(3)]
    while sim.state.calls(slow_key) < 3:  # all three are inside the worker
        await asyncio.sleep(0.05)
    await first.stop()
    # Answered by the stopping worker (no other runs yet); unanswered ones would time out as unavailable.
    assert [r.status for r in await asyncio.gather(*checks)] == [KeyCheckStatus.VALID] * 3
    # Their offsets were committed: a new worker in the same group does not check them again.
    second = await start_worker(settings)
    try:
        assert (await requester.check("after", "groq", key(Provider.GROQ, "valid"))).status is KeyCheckStatus.VALID
    finally:
        await second.stop()
    assert sim.state.calls(slow_key) == 3


async def test_a_request_the_worker_fails_on_is_dead_lettered_and_its_partition_moves_on(
    worker, requester, kafka_bootstrap, kafka_topics
):
    """Even a bug in the handler (it is written never to raise) cannot hold a partition's commits."""
    requests_topic = kafka_topics + "key_check_requests"
    handler = worker.worker.handler
    real_handle = handler.handle

    async def handle(record):
        if record.value == b"boom":
            raise RuntimeError("a bug")
        return await real_handle(record)

    handler.handle = handle
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(requests_topic, b"boom", key=b"alice")
    finally:
        await producer.stop()
    result = await requester.check("alice", "openai", key(Provider.OPENAI, "valid"))
    assert result.status is KeyCheckStatus.VALID
    dead = await read_topic(kafka_bootstrap, requests_topic + ".dlq", want=1)
    assert [(r.value, dict(r.headers)["dlq.error_type"]) for r in dead] == [(b"boom", b"internal_error")]
    # Nothing is left unanswered, so every partition's commit point reaches its end.
    for progress in worker.worker._progress.values():
        assert not progress.pending
