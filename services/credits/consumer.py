"""FastStream wiring: `model_call_completed` batches into the CreditService.

Offsets are committed only after the ledger transaction has committed (see CommitPipeline); a
rebalance in between only causes a redelivery, which the ledger ignores.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
import logging
from typing import Any

from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from services.credits import metrics
from services.credits.service import CreditService, Prepared
from services.credits.settings import CreditSettings

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
    """Overlaps the CPU work of batch N+1 with the ledger transaction of batch N.

    Batches are committed one at a time, in order; the offsets of a batch are committed to Kafka
    only once its ledger transaction has committed. A batch the ledger cannot take (PostgreSQL away)
    is retried, never skipped, and the next batch waits for it.
    """

    def __init__(self, service: CreditService):
        self.service = service
        self._in_flight: asyncio.Task | None = None

    async def submit(self, records: list[ConsumerRecord], consumer) -> None:
        prepared = self.service.prepare(records)
        await self.drain()
        # A partition's records arrive in offset order, so the last one of each wins.
        offsets = {TopicPartition(r.topic, r.partition): r.offset + 1 for r in records}
        self._in_flight = asyncio.create_task(self._commit(prepared, offsets, consumer))

    async def drain(self) -> None:
        if self._in_flight is not None:
            task, self._in_flight = self._in_flight, None
            await task

    async def _commit(self, prepared: Prepared, offsets: dict[TopicPartition, int], consumer) -> None:
        delay = 0.1
        while True:
            try:
                await self.service.commit(prepared)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the batch stays ours until the ledger has it
                metrics.LEDGER_RETRIES.inc()
                log.warning("ledger write failed (%s: %s); retrying the batch in %.1f s",
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError, IllegalStateError) as exc:
            # Decisions are committed; the records will be redelivered and found already decided.
            log.warning("offset commit failed after the ledger commit (%s); redelivery is harmless", exc)


@dataclass
class CreditConsumer:
    broker: KafkaBroker
    subscriber: Any  # its `.consumer` is the AIOKafkaConsumer (for the lag gauge)
    pipeline: CommitPipeline

    async def start(self) -> None:
        await self.broker.start()

    async def stop(self) -> None:
        await self.broker.stop()
        await self.pipeline.drain()  # the ledger write in flight completes; its records are redelivered


def build_consumer(settings: CreditSettings, service: CreditService) -> CreditConsumer:
    broker = KafkaBroker(settings.kafka_bootstrap_servers, client_id="credits", logger=log)

    subscriber = broker.subscriber(
        settings.model_call_completed_topic,
        group_id=settings.topic(settings.consumer_group),  # a prefixed deployment has its own group
        group_instance_id=settings.consumer_instance_id,
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

    pipeline = CommitPipeline(service)

    @subscriber
    async def on_model_calls(body: Any, msg: KafkaMessage) -> None:
        await pipeline.submit(list(msg.raw_message), msg.consumer)

    return CreditConsumer(broker, subscriber, pipeline)


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


async def track_lag(subscriber, every_s: float = 5.0) -> None:
    """Keep the consumer-lag gauge current."""
    while True:
        await asyncio.sleep(every_s)
        try:
            lag = await consumer_lag(subscriber)
        except Exception as exc:
            log.debug("lag not measured: %s", exc)
            continue
        if lag is not None:
            metrics.CONSUMER_LAG.set(lag)
