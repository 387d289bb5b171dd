"""Credit service instances as real processes: a SIGKILLed static member resumes when restarted, and
two instances share the work through kills of each. The ledger stays exact: nothing lost, nothing
doubled."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.test_credit_faults import assert_exact, credit_process, ledger_state, workload
from tests.support import publish, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def feed(bootstrap: str, topic: str, events, chunk: int = 200, every_s: float = 0.3) -> None:
    for i in range(0, len(events), chunk):
        await publish(bootstrap, topic, events[i : i + chunk])
        await asyncio.sleep(every_s)


async def decided(stack) -> int:
    return (await ledger_state(stack.database_url, stack.database_schema))[0]


async def progress_beyond(stack, n: int, timeout_s: float, what: str) -> int:
    async def beyond():
        count = await decided(stack)
        return count if count > n else 0

    return await wait_for(beyond, timeout_s=timeout_s, every_s=0.1, what=what)


async def test_a_sigkilled_static_member_resumes_on_restart_before_its_session_could_expire(stack, tmp_path):
    """With a 60 s session, a new dynamic member would wait for the dead one to expire; the same
    instance name takes its partitions straight back."""
    events, expected = workload(3000)
    topic = stack.settings().model_call_completed_topic
    env = stack.env() | {"CREDITS_INSTANCE": "credits-1", "SESSION_TIMEOUT_MS": "60000"}
    proc = credit_process(env, tmp_path / "credits.log").launch()
    feeder = asyncio.create_task(feed(stack.kafka_bootstrap, topic, events))
    try:
        await progress_beyond(stack, 0, 60, "first decisions")
        proc.kill()
        at_kill = await decided(stack)
        proc.launch()
        await progress_beyond(stack, at_kill, 40, "decisions after the restart")
        await feeder
        await assert_exact(stack.database_url, stack.database_schema, events, expected)
    finally:
        feeder.cancel()
        proc.stop()


async def test_two_instances_under_load_survive_a_sigkill_of_each(stack, tmp_path):
    events, expected = workload(4000)  # fed over about 25 s, so that both kills land under load
    topic = stack.settings().model_call_completed_topic
    env = stack.env() | {"SESSION_TIMEOUT_MS": "6000"}  # the broker's minimum: dead members go fast
    a = credit_process(env | {"CREDITS_INSTANCE": "credits-1"}, tmp_path / "credits-1.log").launch()
    b = credit_process(env | {"CREDITS_INSTANCE": "credits-2"}, tmp_path / "credits-2.log").launch()
    feeder = asyncio.create_task(feed(stack.kafka_bootstrap, topic, events, chunk=100, every_s=0.6))
    try:
        await asyncio.gather(a.wait_healthy(), b.wait_healthy())
        await progress_beyond(stack, 0, 60, "first decisions")
        a.kill()  # b goes on with its partitions, and takes a's once a's session expires
        await progress_beyond(stack, await decided(stack), 60, "decisions by the survivor")
        a.launch()
        await a.wait_healthy()
        await progress_beyond(stack, await decided(stack), 60, "decisions with both")
        b.kill()  # now a alone
        await progress_beyond(stack, await decided(stack), 60, "decisions by the other survivor")
        assert not feeder.done(), "both kills landed while events were still arriving"
        await feeder
        await assert_exact(stack.database_url, stack.database_schema, events, expected)
    finally:
        feeder.cancel()
        a.stop()
        b.stop()
