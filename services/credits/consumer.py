"""FastStream wiring: `model_call_completed` batches into the CreditService.

Offsets are committed only after the ledger transaction has committed. A batch the ledger cannot
take (PostgreSQL away) is retried, never skipped; a rebalance in between only causes a redelivery,
which the ledger ignores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from services.credits import metrics
from services.credits.service import CreditService
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


def build_broker(settings: CreditSettings, service: CreditService):
    """The broker and its one subscriber (whose `.consumer` the lag gauge reads)."""
    broker = KafkaBroker(settings.kafka_bootstrap_servers, client_id="credits", logger=log)

    subscriber = broker.subscriber(
        settings.model_call_completed_topic,
        group_id=settings.consumer_group,
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

    @subscriber
    async def on_model_calls(body: Any, msg: KafkaMessage) -> None:
        records = list(msg.raw_message)
        delay = 0.1
        while True:
            try:
                await service.process(records)
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
            await msg.ack()
        except (CommitFailedError, KafkaError) as exc:
            # Decisions are committed; the records will be redelivered and found already decided.
            log.warning("offset commit failed after the ledger commit (%s); redelivery is harmless", exc)

    return broker, subscriber


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
