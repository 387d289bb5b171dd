"""The credit service's health: the stall watch (billing has stopped committing) and the /healthz report."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from services.credits import metrics
from services.credits.pipeline import CommitPipeline

log = logging.getLogger("services.credits.consumer")  # the name its lines have always been logged under


class StallWatch:
    """Says when billing has stalled: events wait and no ledger transaction has committed for `after_s`.

    Waiting means events taken from Kafka and not yet in the ledger, or records on the broker not yet
    committed (the consumer lag). The clock starts at the later of the last commit and the moment
    work began waiting, so a service idle for an hour is not "stalled" the instant an event arrives.
    """

    def __init__(self, pipeline: CommitPipeline, after_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
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


def health_report(database: bool, consumer: bool, stall: StallWatch | None) -> tuple[dict[str, object], bool]:
    """The /healthz body and whether the service is healthy: the database answers, the consumer runs
    and billing is not stalled. `stall` is None in a process without a consumer."""
    stalled = stall is not None and stall.check()
    ok = database and consumer and not stalled
    body: dict[str, object] = {"status": "ok" if ok else "degraded", "database": database, "consumer": consumer}
    if stall is not None:
        body.update(
            stalled=stalled,
            stall_seconds=round(stall.stall_seconds(), 1),
            events_waiting=stall.pipeline.pending + (stall.lag or 0),
        )
        if stalled:
            body["message"] = (
                f"billing is stalled: events wait and the ledger has not committed for "
                f"{stall.stall_seconds():.0f} s (see the service's log)"
            )
    return body, ok
