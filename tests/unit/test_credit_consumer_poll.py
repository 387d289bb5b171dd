"""The credit consumer's poll: records as soon as getmany has them, no sleep after an empty poll."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import TopicPartition
from faststream.kafka.subscriber import usecase

from services.credits.consumer import build_consumer
from services.credits.settings import CreditSettings


class FakeConsumer:
    """getmany as aiokafka answers it: what the queue holds, else nothing once `timeout_ms` is up."""

    def __init__(self, answers: list[dict[TopicPartition, list[Any]]]):
        self.answers = answers
        self.calls: list[tuple[int, int | None]] = []

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        self.calls.append((timeout_ms, max_records))
        return self.answers.pop(0) if self.answers else {}


@pytest.fixture
def subscriber() -> Any:
    settings = CreditSettings(batch_timeout_ms=500, batch_max_records=7)
    return build_consumer(settings, service=None).subscriber  # type: ignore[arg-type]


async def test_an_empty_poll_returns_at_once_without_sleeping(subscriber: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_sleep(*_: Any) -> None:
        raise AssertionError("the batch loop slept after an empty poll")

    monkeypatch.setattr(usecase.anyio, "sleep", no_sleep)
    consumer = FakeConsumer([])
    assert await subscriber.get_msg(consumer) == ()
    assert consumer.calls == [(500, 7)]  # getmany itself waits the timeout, with the batch size


async def test_records_of_every_partition_come_in_one_batch(subscriber: Any) -> None:
    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    consumer = FakeConsumer([{a: ["a1", "a2"], b: ["b1"]}])
    assert await subscriber.get_msg(consumer) == ("a1", "a2", "b1")


async def test_without_the_override_faststream_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason for the override: FastStream's own poll sleeps its timeout after an empty poll (if a
    FastStream upgrade drops that sleep, this fails and the override can go)."""
    from faststream.kafka import KafkaBroker

    slept: list[float] = []

    async def record_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(usecase.anyio, "sleep", record_sleep)
    plain = KafkaBroker("127.0.0.1:1").subscriber("t", batch=True, max_records=7, batch_timeout_ms=500)
    assert await plain.get_msg(FakeConsumer([])) == ()
    assert slept == [0.5]
