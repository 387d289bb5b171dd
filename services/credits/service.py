"""The credit service's use case: a batch of records in, decisions committed to the ledger.

Split in two steps so the consumer can overlap them: `prepare` (validation and policy, CPU only) of
one batch runs while the ledger transaction of the previous batch is in flight; `commit` runs one
batch at a time, in order.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from dataclasses import dataclass

from billing.policy import decide
from billing.pricing import PriceBook
from services.credits import metrics
from services.credits.decisions import CONFLICT, Decided, Recorded
from services.credits.intake import Record, read_batch
from services.credits.ledger import Ledger
from services.shared.kafka import DeadLetter

log = logging.getLogger(__name__)


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

    @property
    def size(self) -> int:
        return len(self.decided) + len(self.letters)

    def halves(self) -> tuple[Prepared, Prepared]:
        """The batch split in two, in order (dead letters, which precede nothing, go first)."""
        items: list[DeadLetter | Decided] = [*self.letters, *self.decided]
        cut = len(items) // 2

        def part(chunk: list[DeadLetter | Decided]) -> Prepared:
            letters = [x for x in chunk if isinstance(x, DeadLetter)]
            decided = [x for x in chunk if not isinstance(x, DeadLetter)]
            return Prepared(len(chunk), decided, letters, self.started)

        return part(items[:cut]), part(items[cut:])


class CreditService:
    """Decides batches of `model_call_completed` records and commits the decisions to the ledger."""

    def __init__(self, ledger: Ledger, book: PriceBook):
        self.ledger, self.book = ledger, book

    def prepare(self, records: list[Record]) -> Prepared:
        """Validate every record and decide every event (no I/O)."""
        started = time.perf_counter()
        try:
            decided, bad = self._decide(records)
        except Exception:  # a bug on one record must not hold back (or, worse, skip) the batch
            decided, bad = [], []
            for record in records:
                try:
                    one, letters = self._decide([record])
                except Exception as exc:
                    log.exception(
                        "deciding %s[%d]@%d failed; dead-lettering it", record.topic, record.partition, record.offset
                    )
                    one, letters = (
                        [],
                        [DeadLetter.of(record, f"the credit service failed on it: {exc!r}"[:2000], "internal_error")],
                    )
                decided += one
                bad += letters
        return Prepared(len(records), decided, bad, started)

    def _decide(self, records: list[Record]) -> tuple[list[Decided], list[DeadLetter]]:
        good, bad = read_batch(records)
        decided = [
            Decided(
                r.event, decide(r.event, self.book), r.record.value, r.record.topic, r.record.partition, r.record.offset
            )
            for r in good
        ]
        return decided, bad

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
        if result.conflicts:
            metrics.DLQ.labels(CONFLICT).inc(result.conflicts)
            log.warning(
                "%d events reused a decided event id for another call: dead-lettered as conflict", result.conflicts
            )
        return result

    async def dead_letter(self, batch: Prepared, error: BaseException) -> None:
        """Send a batch of one record that the ledger refused to the DLQ, with the database's error."""
        reason = f"{type(error).__name__}: {error}"
        letters = [
            DeadLetter(
                d.source_topic,
                d.source_partition,
                d.source_offset,
                d.event.user_id.encode(),
                d.raw,
                f"the ledger refused this event: {reason}",
                "ledger_write",
            )
            for d in batch.decided
        ] + [
            # A dead letter the outbox refused: keep the original bytes, with both reasons.
            DeadLetter(
                x.topic,
                x.partition,
                x.offset,
                x.key,
                x.value,
                f"{x.error}; and the DLQ outbox refused it: {reason}",
                x.error_type,
            )
            for x in batch.letters
        ]
        await self.ledger.record([], letters)
        metrics.EVENTS_CONSUMED.inc(batch.records)
        for letter in letters:
            metrics.DLQ.labels(letter.error_type).inc()
