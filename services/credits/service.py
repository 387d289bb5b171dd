"""The credit service's use case: a batch of records in, decisions committed to the ledger.

Split in two steps so the consumer can overlap them: `prepare` (validation and policy, CPU only) of
one batch runs while the ledger transaction of the previous batch is in flight; `commit` runs one
batch at a time, in order.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from dataclasses import dataclass

from aiokafka.structs import ConsumerRecord

from schemas.pricing import PriceBook
from services.credits import metrics
from services.credits.intake import read_batch
from services.credits.ledger import Decided, Ledger, Recorded
from services.credits.policy import decide
from services.shared.kafka import DeadLetter


@dataclass(frozen=True)
class Prepared:
    records: int
    decided: list[Decided]
    letters: list[DeadLetter]
    started: float

    @staticmethod
    def merge(batches: list[Prepared]) -> Prepared:
        """Several batches as one, in order (one ledger transaction for all of them)."""
        return Prepared(
            sum(b.records for b in batches),
            [d for b in batches for d in b.decided],
            [letter for b in batches for letter in b.letters],
            min(b.started for b in batches),
        )


class CreditService:
    def __init__(self, ledger: Ledger, book: PriceBook):
        self.ledger, self.book = ledger, book

    def prepare(self, records: list[ConsumerRecord]) -> Prepared:
        """Validate every record and decide every event (no I/O)."""
        started = time.perf_counter()
        good, bad = read_batch(records)
        decided = [
            Decided(r.event, decide(r.event, self.book), r.record.value, r.record.topic,
                    r.record.partition, r.record.offset)
            for r in good
        ]
        return Prepared(len(records), decided, bad, started)

    async def commit(self, batch: Prepared) -> Recorded:
        """Write the batch's decisions and dead letters in one ledger transaction."""
        result = await self.ledger.record(batch.decided, batch.letters)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - batch.started)
        metrics.EVENTS_CONSUMED.inc(batch.records)
        metrics.DUPLICATES.inc(result.duplicates)
        metrics.DEBITS.inc(result.debited)
        metrics.CREDITS_DEBITED.inc(result.credits)
        for decision, n in Tally(d.charge.decision.value for d in batch.decided).items():
            metrics.DECISIONS.labels(decision).inc(n)
        for reason, n in Tally(letter.error_type for letter in batch.letters).items():
            metrics.DLQ.labels(reason).inc(n)
        if result.rejected:
            metrics.DLQ.labels("unpriced_model").inc(result.rejected)
        return result

    async def process(self, records: list[ConsumerRecord]) -> Recorded:
        return await self.commit(self.prepare(records))
