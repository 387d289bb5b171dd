"""Reads a range of `model_call_completed` straight from Kafka.

Its own consumer: no group id, so it joins no group, commits nothing and never disturbs the credit
service's `credits` group. Partitions are assigned by hand, sought by timestamp
(`offsets_for_times`), and read up to offsets fixed when the read starts, so a read always ends even
while events keep arriving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TypeAlias

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

# A record as finance reads it: no deserializer, so key and value are bytes (or None).
LogRecord: TypeAlias = ConsumerRecord[bytes, bytes]


class EventLogError(RuntimeError):
    pass


class TopicMissing(EventLogError):
    pass


@dataclass(frozen=True)
class PartitionRange:
    partition: int
    start: int  # first offset to read
    stop: int  # first offset not to read

    @property
    def size(self) -> int:
        return max(0, self.stop - self.start)


def make_reader(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="byok-finance",
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
        fetch_max_wait_ms=100,
    )


class EventLog:
    """One topic of the log, read over a range of record timestamps."""

    def __init__(self, bootstrap: str, topic: str, *, fetch_records: int = 20_000, stall_timeout_s: float = 60.0):
        self.bootstrap, self.topic = bootstrap, topic
        self.fetch_records, self.stall_timeout_s = fetch_records, stall_timeout_s
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> EventLog:
        self._consumer = make_reader(self.bootstrap)
        await self._consumer.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._reader.stop()

    @property
    def _reader(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise EventLogError("the event log is read inside its `async with` only")
        return self._consumer

    async def _partitions(self) -> list[TopicPartition]:
        # `topics()` fetches fresh metadata but keeps only the names; the partitions come from the
        # same fetch (aiokafka's client), as `partitions_for_topic` knows only subscribed topics.
        cluster = await self._reader._client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(self.topic)
        if not partitions:
            raise TopicMissing(f"topic {self.topic!r} does not exist on {self.bootstrap}")
        return [TopicPartition(self.topic, p) for p in sorted(partitions)]

    async def plan(self, from_ms: int | None = None, to_ms: int | None = None) -> list[PartitionRange]:
        """Offsets holding the records with timestamps in [from_ms, to_ms) (None: an open end)."""
        consumer = self._reader
        tps = await self._partitions()
        first = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        start = dict(first)
        if from_ms:
            found = await consumer.offsets_for_times({tp: from_ms for tp in tps})
            start = {tp: (found[tp].offset if found[tp] else end[tp]) for tp in tps}
        stop = dict(end)
        if to_ms is not None and to_ms <= int(time.time() * 1000):
            found = await consumer.offsets_for_times({tp: to_ms for tp in tps})
            stop = {tp: (found[tp].offset if found[tp] else end[tp]) for tp in tps}
        return [PartitionRange(tp.partition, start[tp], stop[tp]) for tp in tps]

    async def read(self, ranges: list[PartitionRange]) -> AsyncIterator[list[LogRecord]]:
        """Yield batches of records of `ranges`, until every partition reached its stop offset."""
        consumer = self._reader
        stops = {TopicPartition(self.topic, r.partition): r.stop for r in ranges if r.size > 0}
        consumer.assign(list(stops))
        for tp in stops:
            consumer.seek(tp, next(r.start for r in ranges if r.partition == tp.partition))
        pending = set(stops)
        last_progress = time.monotonic()
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=500, max_records=self.fetch_records)
            out: list[LogRecord] = []
            for tp, records in batches.items():
                stop = stops[tp]
                if records and records[-1].offset >= stop:
                    records = [r for r in records if r.offset < stop]
                out.extend(records)
            for tp in list(pending):
                if await consumer.position(tp) >= stops[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)
            if out:
                last_progress = time.monotonic()
                yield out
            elif time.monotonic() - last_progress > self.stall_timeout_s:
                raise EventLogError(
                    f"{self.topic}: no progress for {self.stall_timeout_s:.0f} s with partitions "
                    f"{sorted(tp.partition for tp in pending)} short of their end"
                )
            else:
                await asyncio.sleep(0)


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The offsets `group` has committed on `topic` ({} when it has none), read without joining it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="byok-finance")
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: om.offset for tp, om in offsets.items() if tp.topic == topic and om.offset >= 0}
