"""The commit pipeline: batches of records in, ledger transactions out, Kafka offsets committed after.

Offsets are committed only after the ledger transaction has committed; a rebalance in between only
causes a redelivery, which the ledger ignores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import TopicPartition

from services.credits import metrics
from services.credits.intake import Record
from services.credits.service import CreditService, Prepared
from services.shared.db import database_unreachable

log = logging.getLogger("services.credits.consumer")  # the name its lines have always been logged under


class OffsetCommitter(Protocol):
    """What the pipeline needs of the Kafka consumer: committing offsets (aiokafka's `commit`)."""

    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...


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
        self._writer: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._written: dict[TopicPartition, int] = {}  # offsets whose decisions are in the ledger
        self._offset_committer: asyncio.Task[None] | None = None
        self._in_flight = 0
        self.last_commit = time.monotonic()  # of the last ledger transaction (start-up counts as one)

    async def submit(self, records: list[Record], consumer: OffsetCommitter) -> None:
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

    async def _write_queued(self, consumer: OffsetCommitter) -> None:
        while self._queue:
            prepared, offsets = self._take()
            self._in_flight = prepared.size
            await self._commit(prepared, offsets, consumer)
            self._in_flight = 0

    async def _commit(self, prepared: Prepared, offsets: dict[TopicPartition, int], consumer: OffsetCommitter) -> None:
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

    async def _until_reachable(self, write: Callable[..., Awaitable[object]], *args: object) -> None:
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

    async def _commit_offsets(self, consumer: OffsetCommitter) -> None:
        """Commit the offsets of what the ledger holds; whatever was written meanwhile goes next time."""
        while self._written:
            offsets, self._written = self._written, {}
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, KafkaError, IllegalStateError) as exc:
                # Decisions are committed; the records will be redelivered and found already decided.
                log.warning("offset commit failed after the ledger commit (%s); redelivery is harmless", exc)
