"""The Kafka side of the worker: consume requests, run checks concurrently, reply, then commit.

Plain aiokafka rather than a FastStream subscriber, because the worker needs three things at once
that FastStream's per-message handler does not give together: many checks in flight (one slow
provider must not hold up everyone's checks), offsets committed only up to the oldest unanswered
request of each partition (so a crash or restart re-answers, never drops, a request), and replies
plus dead letters sent before that commit. The wire protocol stays FastStream's (see handler.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.shared.kafka import (
    DeadLetter,
    OutageLog,
    kafka_away,
    leave_group_on_stop,
    make_producer,
    refused_for_content,
    send_dead_letters,
)
from services.validation import metrics
from services.validation.handler import Outcome, RequestHandler
from services.validation.settings import ValidationSettings

log = logging.getLogger(__name__)


class PartitionProgress:
    """Which offsets of one partition are answered; the commit point is the oldest unanswered one."""

    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.next_offset: int | None = None  # one past the highest offset taken
        self.committed: int | None = None

    def take(self, offset: int) -> None:
        self.pending.add(offset)
        self.next_offset = max(self.next_offset or 0, offset + 1)

    def done(self, offset: int) -> None:
        self.pending.discard(offset)

    def commit_point(self) -> int | None:
        point = min(self.pending) if self.pending else self.next_offset
        return point if point is not None and point != self.committed else None


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: ValidationWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.worker._finish_partitions(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        for tp in assigned:
            self.worker._progress[tp] = PartitionProgress()


class ValidationWorker:
    """Consumes `key_check_requests` (group `validation`) and answers each on its `reply_to` topic."""

    def __init__(self, settings: ValidationSettings, handler: RequestHandler) -> None:
        self.settings, self.handler = settings, handler
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._outages = OutageLog(log, "validation worker")
        self._progress: dict[TopicPartition, PartitionProgress] = {}
        self._tasks: dict[asyncio.Task[None], TopicPartition] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def _consumer(self) -> AIOKafkaConsumer:
        """The consumer `start` made (the loop and the commits run only after it)."""
        if self.consumer is None:
            raise RuntimeError("the validation worker is used before start()")
        return self.consumer

    def _producer(self) -> AIOKafkaProducer:
        """The producer `start` made (answers are sent only after it)."""
        if self.producer is None:
            raise RuntimeError("the validation worker is used before start()")
        return self.producer

    async def start(self) -> None:
        s = self.settings
        self.producer = make_producer(s.kafka_bootstrap_servers, linger_ms=0, client_id="validation")
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            # The topic prefix isolates groups too, so parallel stacks on one broker do not rebalance each other.
            group_id=s.topic(s.consumer_group),
            group_instance_id=s.static_member_id,
            client_id="validation",
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a request sent before the group's first start is still answered
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            max_partition_fetch_bytes=1024 * 1024,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(1000, s.session_timeout_ms // 3),
        )
        await self.producer.start()
        try:
            await self.consumer.start()
        except Exception:
            await self.producer.stop()
            raise
        self.consumer.subscribe([s.key_check_requests_topic], listener=_Rebalance(self))
        self._loop_task = asyncio.create_task(self._run(), name="validation-worker")

    async def stop(self) -> None:
        """Finish the checks in flight, send their replies, commit, leave the group."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self.consumer is not None:
            await self._finish_partitions(set(self._progress))
            leave_group_on_stop(self.consumer)  # a static member too: its partitions move on at once
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()

    async def _run(self) -> None:
        s = self.settings
        consumer = self._consumer()
        while not self._stopping:
            try:
                room = s.max_in_flight - len(self._tasks)
                if room <= 0:
                    await asyncio.wait(list(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch = await consumer.getmany(timeout_ms=100, max_records=room)
                for tp, records in batch.items():
                    progress = self._progress.setdefault(tp, PartitionProgress())
                    for record in records:
                        progress.take(record.offset)
                        task = asyncio.create_task(self._answer(tp, record))
                        self._tasks[task] = tp
                        task.add_done_callback(self._tasks.pop)
                await self._commit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop outlives any one failure (broker away, a bug in one batch)
                if kafka_away(exc):
                    self._outages.down("Kafka", exc)  # one line per outage
                else:
                    log.exception("worker loop iteration failed; continuing")
                await asyncio.sleep(0.5)

    async def _answer(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        with metrics.HANDLE_SECONDS.time():
            try:
                outcome = await self.handler.handle(record)
            except Exception as exc:  # handle() should never raise; if it does, this record must not hold its partition
                log.exception("handling %s[%d]@%d failed; dead-lettering it", tp.topic, tp.partition, record.offset)
                metrics.DEAD_LETTERS.labels("internal_error").inc()
                outcome = Outcome(
                    dead_letter=DeadLetter.of(
                        record, f"the worker failed on it: {type(exc).__name__}", "internal_error"
                    )
                )
            delay, attempts = 0.2, 0
            while True:
                try:
                    await self._send(outcome)
                    self._outages.up("Kafka")
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # not answered, so not committed: keep trying
                    attempts += 1
                    if self._stopping:
                        log.warning(
                            "reply to %s[%d]@%d not sent before stopping; it will be redelivered",
                            tp.topic,
                            tp.partition,
                            record.offset,
                        )
                        return
                    if outcome.reply is not None and attempts >= self.settings.reply_attempts:
                        # The reply topic itself may be the problem (e.g. a reply_to that does not exist):
                        # park the request in the DLQ rather than hold its partition forever.
                        metrics.DEAD_LETTERS.labels("reply_failed").inc()
                        outcome = Outcome(
                            dead_letter=DeadLetter.of(
                                record,
                                f"the reply to {outcome.reply.topic[:200]!r} could not be sent: {type(exc).__name__}",
                                "reply_failed",
                            )
                        )
                        continue
                    if outcome.reply is None and outcome.dead_letter is not None and refused_for_content(exc):
                        # Kafka will never take this letter as it is: keep the reason and the size, not the bytes.
                        letter = outcome.dead_letter
                        size = len(letter.value or b"")
                        outcome = Outcome(
                            dead_letter=dataclasses.replace(
                                letter,
                                value=b"",
                                error=f"{letter.error}; value of {size} bytes dropped: "
                                f"the DLQ refused it ({type(exc).__name__})",
                            )
                        )
                        continue
                    if kafka_away(exc):
                        self._outages.down("Kafka", exc)  # one line per outage, not per answer and retry
                    else:
                        log.warning(
                            "sending the answer to %s[%d]@%d failed (%s); retrying",
                            tp.topic,
                            tp.partition,
                            record.offset,
                            type(exc).__name__,
                        )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        progress = self._progress.get(tp)
        if progress is not None:
            progress.done(record.offset)

    async def _send(self, outcome: Outcome) -> None:
        producer = self._producer()
        if outcome.reply is not None:
            r = outcome.reply
            await (await producer.send(r.topic, r.value, key=r.key, headers=r.headers))
        if outcome.dead_letter is not None:
            await send_dead_letters(producer, [outcome.dead_letter])

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        consumer = self._consumer()
        offsets: dict[TopicPartition, int] = {}
        for tp, progress in self._progress.items():
            if only is not None and tp not in only:
                continue
            point = progress.commit_point()
            if point is not None:
                offsets[tp] = point
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:  # harmless: uncommitted requests are answered again, never lost
            if kafka_away(exc):
                self._outages.down("Kafka", exc)
            else:
                log.warning("offset commit failed (%s); will retry", type(exc).__name__)
            return
        self._outages.up("Kafka")
        for tp, point in offsets.items():
            self._progress[tp].committed = point

    async def _finish_partitions(self, tps: set[TopicPartition]) -> None:
        """Let the checks of `tps` finish (bounded by the provider timeout) and commit them."""
        tasks = [t for t, tp in list(self._tasks.items()) if tp in tps]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.check_timeout_s + 5)
        await self._commit(tps)
        for tp in tps:
            self._progress.pop(tp, None)
