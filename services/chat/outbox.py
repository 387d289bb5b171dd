"""ModelCallCompleted events that are never lost: a transactional outbox in PostgreSQL, relayed to Kafka.

`services/chat/call_store.py` writes a call's row before anything is held or asked (holding the call as
*failed*, ending `interrupted`, the safe default) and turns it into the real event once the call ended.
`OutboxRelay` publishes ready rows, and pending rows whose instance's lease lapsed (the instance is
gone), to `model_call_completed` keyed by user id, and deletes each row only after Kafka acknowledged it. If
Kafka is down the rows wait; if the relay dies after the ack but before the delete, the event is sent
again with the same `event_id`, which the credit service applies once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import asyncpg
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter

from services.chat.call_store import INTERRUPTED_STATUS, interrupted_body
from services.shared.kafka import OutageLog, park, part_away, refused_for_content

log = logging.getLogger(__name__)
# Several chat instances share one outbox (SKIP LOCKED): each says how many events it relayed.
PUBLISHED = Counter("chat_outbox_published_total", "ModelCallCompleted events this instance relayed to Kafka")


# Ready rows, and pending rows whose call can no longer finish: their instance's lease lapsed, or (rows
# written before instances had leases) they are older than the old fixed delay.
_DUE = """
DELETE FROM chat_outbox WHERE id IN (
    SELECT o.id FROM chat_outbox o
     WHERE o.ready
        OR (o.instance_id IS NULL AND o.created_at < now() - make_interval(secs => $1))
        OR (o.instance_id IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM chat_instances i WHERE i.instance_id = o.instance_id AND i.alive_until > now()))
     ORDER BY o.id LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING id, event_id, user_id, payload, ready
"""
_END_LAPSED = """
UPDATE chat_calls
   SET ended_at = now(),
       outcome = jsonb_build_object('status', $2::int, 'body', $3::jsonb || jsonb_build_object('event_id', event_id::text))
 WHERE event_id = ANY($1::uuid[]) AND ended_at IS NULL
"""


class OutboxRelay:
    """Publishes outbox rows to Kafka until stopped; survives Kafka being down (rows wait)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        make_producer: Callable[[], AIOKafkaProducer],
        topic: str,
        *,
        batch: int = 500,
        idle_poll_s: float = 0.5,
        linger_s: float = 0.0,
        stale_after_s: float = 90.0,
        send_timeout_s: float = 15.0,
    ):
        self.pool, self.make_producer, self.topic = pool, make_producer, topic
        self.batch, self.idle_poll_s, self.stale_after_s, self.send_timeout_s = (
            batch,
            idle_poll_s,
            stale_after_s,
            send_timeout_s,
        )
        # After a wake-up, wait this long for more rows: under load one relay round (a transaction and
        # a Kafka acknowledgement) then carries many events instead of one or two.
        self.linger_s = linger_s
        self._wake = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._outages = OutageLog(log, "outbox relay")
        self.published = 0

    def wake(self) -> None:
        """Called when a row became ready, so it goes out now rather than at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chat-outbox-relay")

    async def stop(self) -> None:
        """Stop relaying; what is ready by now is sent first (a round may be lingering for more)."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
            await self._flush()
        await self._drop_producer()

    async def _flush(self) -> None:
        # A stopping chat may be the only one: rows left ready would wait for its next start. If Kafka or
        # PostgreSQL is away they do wait (nothing is lost), and the stop is not held up for long.
        try:
            while await asyncio.wait_for(self.relay_once(), self.send_timeout_s) == self.batch:
                pass
        except Exception as exc:
            log.warning("outbox relay: ready events left for the next start (%s: %s)", type(exc).__name__, exc)

    async def _producer_ready(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = self.make_producer()
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), 10)
            except Exception:  # a producer that cannot flush to a dead broker is discarded anyway
                pass

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                sent = await self.relay_once()
                backoff = 0.2
                self._outages.up("PostgreSQL", *(("Kafka",) if sent else ()))
            except Exception as exc:
                # Which part is away decides the log line (one per outage, one when it is back) and
                # whether the producer is started afresh; a bug must not end the relay either: the rows
                # wait (rolled back) and are retried.
                part = await part_away(exc, self.pool)
                if part is None:
                    log.exception("outbox relay round failed; retrying in %.1f s", backoff)
                else:
                    self._outages.down(part, exc)
                if part == "Kafka":
                    await self._drop_producer()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if sent < self.batch:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.idle_poll_s)
                except TimeoutError:
                    pass
                else:
                    if self.linger_s > 0:
                        await asyncio.sleep(self.linger_s)

    async def relay_once(self) -> int:
        """Publish one batch of due rows and delete them once acknowledged; returns how many.

        Due: ready rows, and pending rows whose instance's lease lapsed (the instance is gone, so its
        call can no longer finish): those are published as they stand, failed with ending
        `interrupted`, and their calls end as interrupted. The rows are deleted (and locked) in one
        statement, in a transaction that commits only after Kafka acknowledged them all: if the
        publish fails, the rollback keeps them.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_DUE, self.stale_after_s, self.batch)
            if not rows:
                return 0
            rows = sorted(rows, key=lambda r: r["id"])  # RETURNING has no order; a user's events keep theirs
            lapsed = [r["event_id"] for r in rows if not r["ready"]]
            if lapsed:
                await conn.execute(_END_LAPSED, lapsed, INTERRUPTED_STATUS, json.dumps(interrupted_body()))
            await asyncio.wait_for(self._publish(conn, rows), self.send_timeout_s)
        self.published += len(rows)
        PUBLISHED.inc(len(rows))
        return len(rows)

    async def _publish(self, conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
        """Send the rows and wait for every ack; a row Kafka refuses as it is (too large, ...) is parked
        in `parked_messages` (same transaction), so it can neither block the rows behind it nor be lost."""
        producer = await self._producer_ready()
        sent = []
        for r in rows:
            try:
                sent.append((r, await producer.send(self.topic, value=bytes(r["payload"]), key=r["user_id"].encode())))
            except Exception as exc:
                if not refused_for_content(exc):
                    raise
                await park(conn, "chat_outbox", self.topic, r["user_id"].encode(), bytes(r["payload"]), "{}", exc)
        results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        for (r, _), result in zip(sent, results, strict=True):
            if isinstance(result, BaseException):
                if not refused_for_content(result):
                    raise result
                await park(conn, "chat_outbox", self.topic, r["user_id"].encode(), bytes(r["payload"]), "{}", result)
