"""FastStream wiring: `model_call_completed` batches into the CreditService.

Offsets are committed only after the ledger transaction has committed (see CommitPipeline); a
rebalance in between only causes a redelivery, which the ledger ignores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from services.credits import metrics
from services.credits.service import CreditService, Prepared
from services.credits.settings import CreditSettings
from services.shared.db import database_unreachable
from services.shared.kafka import leave_group_on_stop

log = logging.getLogger(__name__)


def _clean_headers(record: ConsumerRecord) -> ConsumerRecord:
    # FastStream decodes headers as UTF-8; one bad header byte must not poison a whole batch.
    try:
        for _, value in record.headers:
            value.decode()
        return record
    except UnicodeDecodeError:
        headers = [(k, v.decode(errors="replace").encode()) for k, v in record.headers]
        return dataclasses.replace(record, headers=headers)


async def tolerant_parser(records: tuple[ConsumerRecord, ...], original):
    return await original(tuple(_clean_headers(r) for r in records))


async def raw_decoder(message, original) -> None:
    # Records are validated one by one in services.credits.intake, not by FastStream as a whole.
    return None


class CommitPipeline:
    """Keeps fetching while the ledger writes, and writes what piled up in one transaction.

    `submit` validates a batch (CPU only) and queues it; a single writer task commits everything
    queued so far in one ledger transaction (group commit), then commits those records' offsets to
    Kafka. The handler returns at once, so FastStream goes straight back to the broker: aiokafka does
    not fetch a partition again until its buffered records are taken, and a handler that waited for
    the ledger would leave new events on the broker for a whole extra transaction.

    Batches are written in the order they arrived; offsets are committed only after the ledger
    transaction that holds their decisions has committed, by a task of their own so that the next
    ledger transaction need not wait for Kafka's answer. A transaction the ledger cannot take
    (PostgreSQL away) is retried, never skipped; meanwhile the queue fills up to `max_queued`
    events and then `submit` waits, which stops the fetching.
    """

    def __init__(self, service: CreditService, *, max_queued: int = 20_000, max_per_transaction: int = 20_000):
        self.service = service
        self.max_queued, self.max_per_transaction = max_queued, max_per_transaction
        self._queue: list[tuple[Prepared, dict[TopicPartition, int]]] = []
        self._queued = 0
        self._writer: asyncio.Task | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._written: dict[TopicPartition, int] = {}  # offsets whose decisions are in the ledger
        self._offset_committer: asyncio.Task | None = None
        self._in_flight = 0
        self.last_commit = time.monotonic()  # of the last ledger transaction (start-up counts as one)

    async def submit(self, records: list[ConsumerRecord], consumer) -> None:
        prepared = self.service.prepare(records)
        # A partition's records arrive in offset order, so the last one of each wins.
        offsets = {TopicPartition(r.topic, r.partition): r.offset + 1 for r in records}
        while self._queued >= self.max_queued:
            self._room.clear()
            await self._room.wait()
        self._queue.append((prepared, offsets))
        self._queued += len(prepared.decided) + len(prepared.letters)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued(consumer))

    async def drain(self) -> None:
        """Wait until everything submitted is in the ledger (and its offsets committed, if possible)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        while self._offset_committer is not None and not self._offset_committer.done():
            await asyncio.shield(self._offset_committer)

    def _take(self) -> tuple[Prepared, dict[TopicPartition, int]]:
        """The oldest queued batches, merged into one transaction's worth."""
        taken, size = 0, 0
        while taken < len(self._queue) and (taken == 0 or size < self.max_per_transaction):
            size += len(self._queue[taken][0].decided)
            taken += 1
        batches, self._queue = self._queue[:taken], self._queue[taken:]
        self._queued = sum(len(p.decided) + len(p.letters) for p, _ in self._queue)
        self._room.set()
        if len(batches) == 1:
            return batches[0]
        offsets: dict[TopicPartition, int] = {}
        for _, batch_offsets in batches:
            offsets.update(batch_offsets)  # later batches hold later offsets
        return Prepared.merge([p for p, _ in batches]), offsets

    async def _write_queued(self, consumer) -> None:
        while self._queue:
            prepared, offsets = self._take()
            self._in_flight = prepared.size
            await self._commit(prepared, offsets, consumer)
            self._in_flight = 0

    async def _commit(self, prepared: Prepared, offsets: dict[TopicPartition, int], consumer) -> None:
        await self._settle(prepared)
        self._written.update(offsets)  # later transactions hold later offsets
        if self._offset_committer is None or self._offset_committer.done():
            self._offset_committer = asyncio.create_task(self._commit_offsets(consumer))

    async def _settle(self, batch: Prepared) -> None:
        """Put every record of `batch` in the ledger or the DLQ, in order; nothing is skipped.

        A transaction that fails because of what it holds (not because the database is away) is split
        in halves until the record(s) it cannot take are found; each of those goes to the DLQ with the
        database's error, the others commit. One odd event thus costs a few extra transactions, never
        a stalled consumer.
        """
        try:
            await self._until_reachable(self.service.commit, batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.ISOLATIONS.inc()
            if batch.size <= 1:
                log.error("ledger refused one record (%s: %s); dead-lettering it", type(exc).__name__, exc)
                await self._until_reachable(self.service.dead_letter, batch, exc)
                return
            first, second = batch.halves()
            await self._settle(first)
            await self._settle(second)

    async def _until_reachable(self, write, *args) -> None:
        """Run `write`, retrying with back-off while the database is unreachable; any other error is raised."""
        delay, failures = 0.1, 0
        while True:
            try:
                await write(*args)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not database_unreachable(exc):
                    raise
                failures += 1
                metrics.LEDGER_RETRIES.inc()
                if failures == 1:  # one line per outage, not one per retry
                    log.warning("ledger unreachable (%s: %s); retrying with back-off", type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.last_commit = time.monotonic()
            if failures:
                log.warning("ledger reachable again after %d retries", failures)
            return

    @property
    def pending(self) -> int:
        """Events taken from Kafka and not yet in the ledger (queued or being written)."""
        return self._queued + (self._in_flight if self._writer is not None and not self._writer.done() else 0)

    async def _commit_offsets(self, consumer) -> None:
        """Commit the offsets of what the ledger holds; whatever was written meanwhile goes next time."""
        while self._written:
            offsets, self._written = self._written, {}
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, KafkaError, IllegalStateError) as exc:
                # Decisions are committed; the records will be redelivered and found already decided.
                log.warning("offset commit failed after the ledger commit (%s); redelivery is harmless", exc)


class StallWatch:
    """Says when billing has stalled: events wait and no ledger transaction has committed for `after_s`.

    Waiting means events taken from Kafka and not yet in the ledger, or records on the broker not yet
    committed (the consumer lag). The clock starts at the later of the last commit and the moment
    work began waiting, so a service idle for an hour is not "stalled" the instant an event arrives.
    """

    def __init__(self, pipeline: CommitPipeline, after_s: float = 30.0, clock=time.monotonic):
        self.pipeline, self.after_s, self.clock = pipeline, after_s, clock
        self.lag: int | None = None  # the latest consumer-lag reading, if any
        self._waiting_since: float | None = None
        self.stalled = False

    def waiting(self) -> bool:
        return self.pipeline.pending > 0 or bool(self.lag)

    def stall_seconds(self) -> float:
        """How long events have waited without a commit (0 when nothing waits)."""
        if not self.waiting():
            self._waiting_since = None
            return 0.0
        now = self.clock()
        if self._waiting_since is None:
            self._waiting_since = now
        return max(0.0, now - max(self.pipeline.last_commit, self._waiting_since))

    def check(self) -> bool:
        """Update the stall state (logging each change once) and the metrics; True when stalled."""
        seconds = self.stall_seconds()
        stalled = seconds >= self.after_s
        if stalled and not self.stalled:
            log.error(
                "billing stalled: %d events waiting and no ledger commit for %.0f s",
                self.pipeline.pending + (self.lag or 0),
                seconds,
            )
        elif self.stalled and not stalled:
            log.warning("billing resumed: the ledger is committing again")
        self.stalled = stalled
        metrics.STALLED.set(1 if stalled else 0)
        metrics.STALL_SECONDS.set(seconds)
        metrics.LAST_COMMIT_AGE.set(self.clock() - self.pipeline.last_commit)
        return stalled

    async def run(self, every_s: float = 1.0) -> None:
        while True:
            self.check()
            await asyncio.sleep(every_s)


@dataclass
class CreditConsumer:
    broker: KafkaBroker
    subscriber: Any  # its `.consumer` is the AIOKafkaConsumer (for the lag gauge)
    pipeline: CommitPipeline
    watch: StallWatch

    async def start(self) -> None:
        await self.broker.start()

    async def stop(self) -> None:
        leave_group_on_stop(getattr(self.subscriber, "consumer", None))  # partitions move on at once
        await self.broker.stop()
        await self.pipeline.drain()  # the ledger write in flight completes; its records are redelivered


def build_consumer(settings: CreditSettings, service: CreditService) -> CreditConsumer:
    # A list: FastStream hands a string to aiokafka as one host, "a:9092,b:9092" included.
    bootstrap = [h.strip() for h in settings.kafka_bootstrap_servers.split(",") if h.strip()]
    broker = KafkaBroker(bootstrap, client_id="credits", logger=log)

    subscriber = broker.subscriber(
        settings.model_call_completed_topic,
        group_id=settings.topic(settings.consumer_group),  # a prefixed deployment has its own group
        group_instance_id=settings.group_instance_id,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(settings.session_timeout_ms // 4, 500),
        batch=True,
        max_records=settings.batch_max_records,
        batch_timeout_ms=settings.batch_timeout_ms,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,
        parser=tolerant_parser,
        decoder=raw_decoder,
        title="credits",
        description="Applies the credit policy to every model call and keeps the ledger.",
    )

    pipeline = CommitPipeline(
        service, max_queued=settings.max_queued_events, max_per_transaction=settings.max_queued_events
    )

    @subscriber
    async def on_model_calls(body: Any, msg: KafkaMessage) -> None:
        await pipeline.submit(list(msg.raw_message), msg.consumer)

    return CreditConsumer(broker, subscriber, pipeline, StallWatch(pipeline, settings.stall_after_s))


async def consumer_lag(subscriber) -> int | None:
    """Records of the assigned partitions not yet committed, or None before the first assignment."""
    consumer = getattr(subscriber, "consumer", None)
    if consumer is None or not consumer.assignment():
        return None
    lag = 0
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is None:
            return None
        lag += max(high - (await consumer.committed(tp) or 0), 0)
    return lag


async def track_lag(subscriber, every_s: float = 5.0, watch: StallWatch | None = None) -> None:
    """Keep the consumer-lag gauge (and the stall watch's reading of it) current."""
    while True:
        await asyncio.sleep(every_s)
        try:
            lag = await consumer_lag(subscriber)
        except Exception as exc:
            log.debug("lag not measured: %s", exc)
            continue
        if lag is not None:
            metrics.CONSUMER_LAG.set(lag)
        if watch is not None:
            watch.lag = lag
