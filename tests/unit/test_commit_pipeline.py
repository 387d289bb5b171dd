"""The credit consumer's group commit: order, offsets only after the ledger, back-pressure, retries."""

import asyncio
import time

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition

from services.credits.health import StallWatch
from services.credits.pipeline import CommitPipeline
from services.credits.service import Prepared

pytestmark = pytest.mark.unit

TOPIC = "model_call_completed"


def records(partition: int, first: int, n: int) -> list[ConsumerRecord]:
    return [ConsumerRecord(TOPIC, partition, first + i, 0, 0, None, b"{}", None, 0, 2, []) for i in range(n)]


class FakeService:
    """Stands for CreditService: 'decides' each record as its offset; the ledger is a list."""

    def __init__(self):
        self.ledger: list[tuple[int, int]] = []
        self.transactions = 0
        self.fail_next = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.log: list[str] = []
        self.poison: set[tuple[int, int]] = set()  # records whose write the "database" refuses
        self.dead: list[tuple[int, int]] = []

    async def dead_letter(self, prepared, error):
        assert isinstance(error, ValueError)
        self.dead.extend(prepared.decided)

    def prepare(self, recs):
        return Prepared(len(recs), [(r.partition, r.offset) for r in recs], [], 0.0)

    async def commit(self, prepared):
        await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("database away")
        if self.poison & set(prepared.decided):
            raise ValueError("date value out of range")  # what the ledger's COPY raised for year 1
        self.transactions += 1
        self.ledger.extend(prepared.decided)
        self.log.append(f"ledger {len(self.ledger)}")


class FakeConsumer:
    def __init__(self, service: FakeService):
        self.service = service
        self.committed: dict[TopicPartition, int] = {}

    async def commit(self, offsets):
        # Every offset committed must already be in the ledger.
        for tp, offset in offsets.items():
            assert (tp.partition, offset - 1) in self.service.ledger
        self.committed.update(offsets)
        self.service.log.append("offsets")


async def test_batches_that_pile_up_go_into_one_transaction_in_order():
    service = FakeService()
    consumer = FakeConsumer(service)
    pipeline = CommitPipeline(service)
    service.gate.clear()  # the first transaction is slow: the next batches queue behind it
    await pipeline.submit(records(0, 0, 3), consumer)
    await asyncio.sleep(0)
    await pipeline.submit(records(1, 0, 2), consumer)
    await pipeline.submit(records(0, 3, 4), consumer)
    service.gate.set()
    await pipeline.drain()
    assert service.ledger == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (0, 3), (0, 4), (0, 5), (0, 6)]
    assert service.transactions == 2  # the first batch, then the two that waited, together
    assert consumer.committed == {TopicPartition(TOPIC, 0): 7, TopicPartition(TOPIC, 1): 2}


async def test_offsets_are_committed_only_after_the_ledger_transaction():
    service = FakeService()
    consumer = FakeConsumer(service)
    pipeline = CommitPipeline(service)
    service.gate.clear()
    await pipeline.submit(records(0, 0, 5), consumer)
    await asyncio.sleep(0.01)
    assert consumer.committed == {}  # the ledger has not got it yet
    service.gate.set()
    await pipeline.drain()
    assert service.log == ["ledger 5", "offsets"]
    assert consumer.committed == {TopicPartition(TOPIC, 0): 5}


async def test_a_failed_transaction_is_retried_never_skipped():
    service = FakeService()
    service.fail_next = 2
    consumer = FakeConsumer(service)
    pipeline = CommitPipeline(service)
    await pipeline.submit(records(0, 0, 3), consumer)
    await pipeline.submit(records(0, 3, 3), consumer)
    await asyncio.wait_for(pipeline.drain(), 5)
    assert service.ledger == [(0, i) for i in range(6)]
    assert consumer.committed == {TopicPartition(TOPIC, 0): 6}


async def test_submit_waits_when_the_ledger_falls_behind():
    service = FakeService()
    consumer = FakeConsumer(service)
    pipeline = CommitPipeline(service, max_queued=10)
    service.gate.clear()
    await pipeline.submit(records(0, 0, 4), consumer)  # taken by the writer at once
    await asyncio.sleep(0)
    await pipeline.submit(records(0, 4, 6), consumer)
    await pipeline.submit(records(0, 10, 4), consumer)  # 10 queued now: the limit
    blocked = asyncio.create_task(pipeline.submit(records(0, 14, 1), consumer))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # fetching stops until the ledger catches up
    service.gate.set()
    await asyncio.wait_for(blocked, 5)
    await pipeline.drain()
    assert service.ledger == [(0, i) for i in range(15)]


async def test_one_transaction_is_capped_in_size():
    service = FakeService()
    consumer = FakeConsumer(service)
    pipeline = CommitPipeline(service, max_per_transaction=5)
    service.gate.clear()
    await pipeline.submit(records(0, 0, 1), consumer)
    await asyncio.sleep(0)
    for start in range(1, 13, 3):
        await pipeline.submit(records(0, start, 3), consumer)
    service.gate.set()
    await pipeline.drain()
    assert service.ledger == [(0, i) for i in range(13)]
    assert service.transactions == 3  # 1, then 3+3 (reaches the cap), then 3+3


async def test_a_record_the_ledger_refuses_is_isolated_and_dead_lettered_while_the_rest_commit_in_order():
    service = FakeService()
    service.poison = {(0, 5), (0, 6), (1, 2)}
    consumer = FakeConsumer(service)
    pipeline = CommitPipeline(service)
    await pipeline.submit(records(0, 0, 10) + records(1, 0, 4), consumer)
    await asyncio.wait_for(pipeline.drain(), 5)
    good = [(0, i) for i in range(10) if i not in (5, 6)] + [(1, 0), (1, 1), (1, 3)]
    assert service.ledger == good  # in order, nothing skipped
    assert sorted(service.dead) == [(0, 5), (0, 6), (1, 2)]
    assert consumer.committed == {TopicPartition(TOPIC, 0): 10, TopicPartition(TOPIC, 1): 4}


async def test_an_unreachable_database_is_retried_not_dead_lettered():
    service = FakeService()
    service.fail_next = 3  # ConnectionError: the database is away, the records are fine
    consumer = FakeConsumer(service)
    pipeline = CommitPipeline(service)
    await pipeline.submit(records(0, 0, 1), consumer)
    await asyncio.wait_for(pipeline.drain(), 5)
    assert service.ledger == [(0, 0)] and service.dead == []


async def test_the_stall_watch_reports_waiting_events_without_a_commit_and_recovers():
    service = FakeService()
    consumer = FakeConsumer(service)
    pipeline = CommitPipeline(service)
    now = [time.monotonic()]  # the pipeline stamps its commits with the real monotonic clock
    watch = StallWatch(pipeline, after_s=30, clock=lambda: now[0])
    pipeline.last_commit = now[0] - 3600  # idle for an hour ...
    assert not watch.check()  # ... but nothing waits: not stalled
    service.gate.clear()
    await pipeline.submit(records(0, 0, 3), consumer)
    await asyncio.sleep(0)
    assert not watch.check()  # work just began waiting: the clock starts now, not at the last commit
    now[0] += 29
    assert not watch.check()
    now[0] += 2
    assert watch.check() and watch.stall_seconds() == pytest.approx(31)
    service.gate.set()
    await pipeline.drain()
    now[0] = time.monotonic()
    assert not watch.check()
    watch.lag = 7  # records on the broker not consumed: waiting again
    assert watch.stall_seconds() == 0
    now[0] += 31
    assert watch.check()
