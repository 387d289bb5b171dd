"""Static group membership: a consumer named by its instance keeps its partitions through a crash, and
a consumer that stops on purpose leaves its group at once (aiokafka alone does not, for a static member)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from services.credits.bootstrap import running
from services.credits.settings import CreditSettings
from services.validation.settings import ValidationSettings
from tests.support import wait_for

pytestmark = pytest.mark.integration

SESSION_MS = 60_000  # a member that did not leave would stay this long


async def members(bootstrap: str, group: str) -> list[str]:
    """The group's current members, by instance id (a static member's id is `<instance id>-<uuid>`)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    [described] = response.to_object()["groups"]
    return [m.get("group_instance_id") or m["member_id"].rsplit("-", 5)[0] for m in described["members"]]


def test_the_instance_name_is_the_static_member_id():
    assert CreditSettings(credits_instance="credits-2").group_instance_id == "credits-2"
    assert CreditSettings(credits_instance="credits-2", consumer_instance_id="x").group_instance_id == "x"
    assert CreditSettings().group_instance_id is None  # no name: a dynamic member
    assert ValidationSettings(validation_instance="validation-1").static_member_id == "validation-1"
    assert ValidationSettings().static_member_id is None


async def test_a_static_credit_consumer_leaves_its_group_when_it_stops(stack):
    settings = stack.settings(
        CreditSettings, credits_instance="credits-a", relay_mode="off", session_timeout_ms=SESSION_MS
    )
    group = settings.topic(settings.consumer_group)
    async with running(settings) as runtime:
        await wait_for(lambda: _assigned(runtime.consumer.subscriber.consumer), timeout_s=30, what="assignment")
        assert await members(stack.kafka_bootstrap, group) == ["credits-a"]
    assert await members(stack.kafka_bootstrap, group) == [], "left at once, not after the session timeout"


async def test_a_static_validation_worker_leaves_its_group_when_it_stops(stack):
    from services.validation.bootstrap import build

    settings = ValidationSettings(
        kafka_bootstrap_servers=stack.kafka_bootstrap,
        topic_prefix=stack.topic_prefix,
        validation_instance="validation-a",
        session_timeout_ms=SESSION_MS,
    )
    validation = build(settings)
    await validation.start()
    try:
        await wait_for(lambda: _assigned(validation.worker.consumer), timeout_s=30, what="assignment")
        assert await members(stack.kafka_bootstrap, settings.topic(settings.consumer_group)) == ["validation-a"]
    finally:
        await validation.stop()
    assert await members(stack.kafka_bootstrap, settings.topic(settings.consumer_group)) == []


async def test_without_the_leave_a_stopped_static_member_stays_in_the_group(stack):
    """The control: what aiokafka does alone, and why services.shared.kafka.leave_group_on_stop exists."""
    group = stack.topic_prefix + "control"
    consumer = AIOKafkaConsumer(
        stack.topic_prefix + "model_call_completed",
        bootstrap_servers=stack.kafka_bootstrap,
        group_id=group,
        group_instance_id="control-a",
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=2000,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        await wait_for(lambda: _assigned(consumer), timeout_s=30, what="assignment")
    finally:
        await consumer.stop()
    assert await members(stack.kafka_bootstrap, group) == ["control-a"]


async def _assigned(consumer) -> bool:
    await asyncio.sleep(0)
    return bool(consumer and consumer.assignment())
