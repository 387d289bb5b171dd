"""No platform call starts unless its price is held: concurrent calls through real chat processes.

Real processes (chat, credits) on the real broker and database; the provider simulator answers the
platform's key slowly, so every call of a burst is in flight at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.harness import ServiceProcess
from services.chat.settings import ChatSettings
from tests.conftest import Stack
from tests.e2e.test_chat_flow import ChatSystem, start_system

pytestmark = pytest.mark.e2e
PLATFORM_OPENAI_KEY = ChatSettings.model_fields["openai_api_key"].default


@pytest.fixture
def system(stack: Stack, tmp_path: Path) -> Iterator[ChatSystem]:
    # A provider timeout of 6 s: a call's outbox row counts as abandoned 6 + 2 s after it began.
    yield from start_system(
        stack.kafka_bootstrap,
        stack.database_url,
        stack.database_schema,
        stack.topic_prefix,
        tmp_path / "logs",
        with_validation=False,
        PROVIDER_TIMEOUT_S="6",
        OUTBOX_STALE_MARGIN_S="2",
    )


def slow_platform(system: ChatSystem, delay_ms: int) -> None:
    system.sim.state.register(PLATFORM_OPENAI_KEY, "valid", delay_ms=delay_ms)


def credits_of(system: ChatSystem, user: str) -> dict:
    r = httpx.get(f"{system.credits.url}/api/credits/{user}", headers={"Authorization": f"Bearer {system.token(user)}"})
    return r.json()


def settled(system: ChatSystem, user: str, balance: int, within_s: float = 60) -> dict:
    """The user's credits once the ledger has the expected balance and no hold is left (or the last seen)."""
    deadline = time.monotonic() + within_s
    while True:
        seen = credits_of(system, user)
        if (seen.get("balance"), seen.get("held")) == (balance, 0) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


async def burst(urls: list[str], token: str, feature: str, n: int) -> Counter:
    """n concurrent calls, spread over the chat instances at `urls`; the count of each status."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        answers = await asyncio.gather(
            *[
                client.post(f"{urls[i % len(urls)]}/chat", json={"feature": feature, "message": f"call {i}"})
                for i in range(n)
            ]
        )
    for a in answers:
        if a.status_code == 402:
            assert "available" in a.json()["message"] and a.json()["available"] >= 0
    return Counter(a.status_code for a in answers)


def choose(system: ChatSystem, user: str, model: str, chat_url: str | None = None) -> None:
    r = httpx.post(
        f"{chat_url or system.chat.url}/settings/model",
        json={"provider": "openai", "model": model},
        headers={"Authorization": f"Bearer {system.token(user)}"},
    )
    assert r.status_code == 200, r.text


def test_twenty_concurrent_deep_analysis_calls_on_fifty_credits_serve_exactly_one(system: ChatSystem):
    system.grant("deep", "free")  # 50 credits; deep analysis costs 50
    slow_platform(system, 500)
    statuses = asyncio.run(burst([system.chat.url], system.token("deep"), "deep_analysis", 20))
    assert statuses == Counter({200: 1, 402: 19}), statuses
    final = settled(system, "deep", 0)
    assert (final["balance"], final["held"], final["available"]) == (0, 0, 0)


def test_forty_concurrent_chat_calls_at_three_credits_never_overspend(system: ChatSystem):
    system.grant("chatty", "free")
    choose(system, "chatty", "gpt-4o-mini")  # 3 credits
    slow_platform(system, 300)
    statuses = asyncio.run(burst([system.chat.url], system.token("chatty"), "chat", 40))
    served = statuses[200]
    assert served <= 16 and served + statuses[402] == 40, statuses
    final = settled(system, "chatty", 50 - 3 * served)
    assert (final["balance"], final["held"]) == (50 - 3 * served, 0)
    print(
        f"one chat process: served {served}, refused {statuses[402]}, final balance {final['balance']}, "
        f"held {final['held']}"
    )


def test_the_same_burst_split_across_two_chat_processes_never_overspends(system: ChatSystem):
    second = ServiceProcess("chat2", "services.chat", dict(system.chat.env), system.log_dir).start()
    try:
        system.grant("split", "free")
        choose(system, "split", "gpt-4o-mini")
        slow_platform(system, 300)
        statuses = asyncio.run(burst([system.chat.url, second.url], system.token("split"), "chat", 40))
    finally:
        second.stop()
    served = statuses[200]
    assert served <= 16 and served + statuses[402] == 40, statuses
    final = settled(system, "split", 50 - 3 * served)
    assert (final["balance"], final["held"]) == (50 - 3 * served, 0)
    print(f"two chat processes: served {served}, refused {statuses[402]}, final balance {final['balance']}")


def test_a_chat_process_killed_mid_call_leaves_no_hold_once_its_failed_event_is_decided(system: ChatSystem):
    system.grant("kill", "free")
    choose(system, "kill", "gpt-4o-mini")
    slow_platform(system, 5000)

    async def call_and_kill() -> None:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {system.token('kill')}"}, timeout=30) as c:
            call = asyncio.ensure_future(c.post(f"{system.chat.url}/chat", json={"feature": "chat", "message": "hi"}))
            deadline = time.monotonic() + 10
            while credits_of(system, "kill").get("held") != 3:  # the hold is in place: the call is running
                assert time.monotonic() < deadline, "the call never held its price"
                await asyncio.sleep(0.1)
            system.chat.kill()
            with pytest.raises(httpx.HTTPError):
                await call

    asyncio.run(call_and_kill())
    assert credits_of(system, "kill")["held"] == 3  # nothing released it: the process is gone
    system.chat.proc = None
    system.chat.start()  # its outbox relay publishes the abandoned call as failed
    final = settled(system, "kill", 50, within_s=60)
    assert (final["balance"], final["held"], final["available"]) == (50, 0, 50)
