"""FastStream wiring: `model_call_completed` batches into the CreditService, and the consumer lag.

Offsets are committed only after the ledger transaction has committed (services.credits.pipeline); a
rebalance in between only causes a redelivery, which the ledger ignores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage

from services.credits import metrics
from services.credits.health import StallWatch
from services.credits.intake import Record
from services.credits.pipeline import CommitPipeline, OffsetCommitter
from services.credits.service import CreditService
from services.credits.settings import CreditSettings
from services.shared.kafka import leave_group_on_stop

log = logging.getLogger(__name__)


def _clean_headers(record: Record) -> Record:
    # FastStream decodes headers as UTF-8; one bad header byte must not poison a whole batch.
    try:
        for _, value in record.headers:
            value.decode()
        return record
    except UnicodeDecodeError:
        headers = [(k, v.decode(errors="replace").encode()) for k, v in record.headers]
        return dataclasses.replace(record, headers=headers)


# FastStream's parser and decoder hooks: the records (or the message) and FastStream's own step.
async def tolerant_parser(records: tuple[Record, ...], original: Callable[[tuple[Record, ...]], Awaitable[Any]]) -> Any:
    return await original(tuple(_clean_headers(r) for r in records))


async def raw_decoder(message: object, original: Callable[[object], Awaitable[Any]]) -> object:
    # Records are validated one by one in services.credits.intake, not by FastStream as a whole: the
    # handler gets the message itself (its records and its consumer), with no dependency injection.
    return message


def poll_without_idle_sleep(subscriber: Any) -> None:
    """Make a FastStream batch subscriber poll with aiokafka's wait alone.

    FastStream's batch loop calls `getmany(timeout_ms=batch_timeout_ms)` and, after an empty poll, sleeps
    `batch_timeout_ms` more. getmany already returns as soon as records arrive and waits out its timeout
    when none do (paused partitions too), so that sleep only delays the first record after a quiet spell,
    and a short timeout (kept short for that reason) made an idle consumer wake 100 times a second: 13 of
    its 21 ms of CPU per second with no traffic (issue 22). Without the sleep, the timeout can be long.
    """

    async def get_msg(consumer: Any) -> tuple[Record, ...]:
        messages = await consumer.getmany(timeout_ms=subscriber.batch_timeout_ms, max_records=subscriber.max_records)
        return tuple(chain.from_iterable(messages.values()))

    subscriber.get_msg = get_msg  # FastStream's consume loop calls self.get_msg(consumer)


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
    # No FastDepends: the handler takes the message from raw_decoder. Injecting it (`msg: KafkaMessage`)
    # cost a thread-pool hop for every batch (fast_depends runs FastStream's Context field, a plain
    # function, in a worker thread), and at 25-100 calls/s a batch is one event (py-spy).
    broker = KafkaBroker(bootstrap, client_id="credits", logger=log, apply_types=False)

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
    poll_without_idle_sleep(subscriber)

    pipeline = CommitPipeline(
        service, max_queued=settings.max_queued_events, max_per_transaction=settings.max_queued_events
    )

    @subscriber
    async def on_model_calls(msg: KafkaMessage) -> None:
        # FastStream's ConsumerProtocol declares commit() without offsets; the object is aiokafka's
        # AIOKafkaConsumer, whose commit takes them.
        batch = msg.raw_message  # a tuple of records: the subscriber is a batch one
        records = list(batch) if isinstance(batch, tuple) else [batch]
        await pipeline.submit(records, cast(OffsetCommitter, msg.consumer))

    return CreditConsumer(broker, subscriber, pipeline, StallWatch(pipeline, settings.stall_after_s))


async def consumer_lag(subscriber: Any) -> int | None:
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


async def track_lag(subscriber: Any, every_s: float = 5.0, watch: StallWatch | None = None) -> None:
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
