"""The credit service's use case: a batch of records in, decisions committed to the ledger."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable

from aiokafka.structs import ConsumerRecord

from schemas.pricing import PriceBook
from services.credits import metrics
from services.credits.intake import read_batch
from services.credits.ledger import Decided, Ledger, Recorded
from services.credits.policy import decide


class CreditService:
    def __init__(self, ledger: Ledger, book: PriceBook, on_committed: Callable[[], None] = lambda: None):
        self.ledger, self.book, self.on_committed = ledger, book, on_committed

    async def process(self, records: list[ConsumerRecord]) -> Recorded:
        """Decide every record of the batch and commit the result in one ledger transaction."""
        started = time.perf_counter()
        good, bad = read_batch(records)
        decided = [
            Decided(r.event, decide(r.event, self.book), r.record.value, r.record.topic,
                    r.record.partition, r.record.offset)
            for r in good
        ]
        result = await self.ledger.record(decided, bad)
        self.on_committed()
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.EVENTS_CONSUMED.inc(len(records))
        metrics.DUPLICATES.inc(result.duplicates)
        metrics.DEBITS.inc(result.debited)
        metrics.CREDITS_DEBITED.inc(result.credits)
        for decision, n in Tally(d.charge.decision.value for d in decided).items():
            metrics.DECISIONS.labels(decision).inc(n)
        for reason, n in Tally(letter.error_type for letter in bad).items():
            metrics.DLQ.labels(reason).inc(n)
        if result.rejected:
            metrics.DLQ.labels("unpriced_model").inc(result.rejected)
        return result
