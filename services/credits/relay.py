"""Publishes what the ledger committed: a CreditOutcome per decision, and the dead letters.

Decision rows are their own outbox (see migrations/0002): the relay reads them past its cursor, sends
them, waits for Kafka's acks, and only then moves the cursor, in one database transaction. A crash
in between re-sends (consumers of `credit_ledger` dedupe by event_id); nothing is lost.

It runs in a process of its own (`python -m services.credits` starts it), so publishing never takes
CPU from the consumer; the consumer's `NOTIFY credit_outcomes` wakes it as soon as a batch commits.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from services.shared.kafka import OutageLog, park, part_away, refused_for_content

log = logging.getLogger(__name__)

CHANNEL = "credit_outcomes"
_LOCK = 0x72656C79  # one relay at a time per database schema

# The CreditOutcome JSON is built by PostgreSQL from the row: the fields of schemas.events.CreditOutcome
# (tests parse what is published with CreditOutcome.from_json). The page is chosen first and the JSON
# built for its rows only: with the LIMIT outside, a fresh table's plan built and sorted the JSON of
# every row past the cursor before keeping a page (474 ms a page against 10 ms, issue 22).
_OUTCOMES = """
SELECT user_id, txid, seq,
       json_build_object('event_id', entry_id, 'user_id', user_id, 'decision', decision, 'reason', reason,
                         'credits', credits, 'balance_after', balance_after,
                         'price_list_version', price_list_version, 'decided_at', recorded_at)::text AS outcome
  FROM (SELECT entry_id, user_id, decision, reason, credits, balance_after, price_list_version, recorded_at,
               txid, seq
          FROM ledger_entries
         WHERE kind = 'decision' AND (txid, seq) > ($1::xid8, $2)
           AND txid < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY txid, seq LIMIT $3) AS page
 ORDER BY txid, seq"""


class OutcomeRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        outcome_topic: str,
        *,
        batch: int = 5000,
        idle_poll_s: float = 0.2,
        name: str = "credit_outcomes",
    ):
        self.pool, self.producer, self.topic = pool, producer, outcome_topic
        self.batch, self.idle_poll_s, self.name = batch, idle_poll_s, name
        self._wake = asyncio.Event()
        self._partitioner = DefaultPartitioner()
        self._partition_of: dict[str, int] = {}
        self._partition_count = 0
        self.published = 0
        self._outages = OutageLog(log, "outcome relay")

    def wake(self, *_: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        listener = await self.pool.acquire()
        await listener.add_listener(CHANNEL, self.wake)
        try:
            while True:
                try:
                    sent = await self.run_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Kafka or PostgreSQL away (or a bug): keep trying, lose nothing
                    part = await part_away(exc, self.pool)
                    if part is None:
                        log.exception("outcome relay round failed; retrying")
                    else:
                        self._outages.down(part, exc)
                    await asyncio.sleep(1)
                    continue
                self._outages.up("PostgreSQL", *(("Kafka",) if sent else ()))
                if sent < self.batch:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.idle_poll_s)
                    except TimeoutError:
                        pass
        finally:
            try:
                await listener.remove_listener(CHANNEL, self.wake)
            finally:
                await self.pool.release(listener)

    async def _send_keyed(self, rows: list[asyncpg.Record]) -> list[asyncio.Future[Any]]:
        """Send the outcomes in per-partition batches, partitioned by user_id like a keyed send."""
        partitions = sorted(await self.producer.partitions_for(self.topic))
        if len(partitions) != self._partition_count:  # the topic grew: keys map elsewhere now
            self._partition_of.clear()
            self._partition_count = len(partitions)
        by_partition: dict[int, list[asyncpg.Record]] = defaultdict(list)
        for r in rows:
            user = r["user_id"]
            partition = self._partition_of.get(user)
            if partition is None:  # aiokafka's murmur2 is pure Python: hash each user once
                if len(self._partition_of) > 100_000:
                    self._partition_of.clear()
                partition = self._partition_of[user] = self._partitioner(user.encode(), partitions, partitions)
            by_partition[partition].append(r)
        futures = []
        for partition, items in by_partition.items():
            batch = self.producer.create_batch()
            for r in items:
                if batch.append(key=r["user_id"].encode(), value=r["outcome"].encode(), timestamp=None) is None:
                    batch.close()
                    futures.append(await self.producer.send_batch(batch, self.topic, partition=partition))
                    batch = self.producer.create_batch()
                    batch.append(key=r["user_id"].encode(), value=r["outcome"].encode(), timestamp=None)
            batch.close()
            futures.append(await self.producer.send_batch(batch, self.topic, partition=partition))
        return futures

    async def _send_letters(
        self, conn: asyncpg.Connection, letters: list[asyncpg.Record]
    ) -> Callable[[], Awaitable[None]]:
        """Send the dead letters; one Kafka refuses as it is (too large, ...) is parked, not retried forever."""
        sent: list[tuple[asyncpg.Record, asyncio.Future[Any]]] = []
        for letter in letters:
            headers = [(k, v.encode()) for k, v in json.loads(letter["headers"]).items()]
            try:
                sent.append(
                    (
                        letter,
                        await self.producer.send(
                            letter["topic"], letter["payload"], key=letter["key"], headers=headers
                        ),
                    )
                )
            except Exception as exc:
                if not refused_for_content(exc):
                    raise
                await park(
                    conn, "credit_outbox", letter["topic"], letter["key"], letter["payload"], letter["headers"], exc
                )

        async def acknowledged() -> None:
            results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
            for (letter, _), result in zip(sent, results, strict=True):
                if isinstance(result, BaseException):
                    if not refused_for_content(result):
                        raise result
                    await park(
                        conn,
                        "credit_outbox",
                        letter["topic"],
                        letter["key"],
                        letter["payload"],
                        letter["headers"],
                        result,
                    )

        return acknowledged  # awaited after the outcomes' acks: one statement at a time on `conn`

    async def run_once(self) -> int:
        """Publish one batch; return how many messages were sent."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
                return 0
            cursor = await conn.fetchrow("SELECT last_txid, last_seq FROM relay_cursors WHERE name = $1", self.name)
            last_txid, last_seq = (cursor["last_txid"], cursor["last_seq"]) if cursor else (0, 0)
            rows = await conn.fetch(_OUTCOMES, last_txid, last_seq, self.batch)
            letters = await conn.fetch(
                "SELECT id, topic, key, payload, headers FROM credit_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self.batch,
            )
            if not rows and not letters:
                return 0
            futures = await self._send_keyed(rows) if rows else []
            letters_acknowledged = await self._send_letters(conn, letters)
            await asyncio.gather(*futures)
            await letters_acknowledged()
            if rows:
                last = rows[-1]
                await conn.execute(
                    """INSERT INTO relay_cursors (name, last_txid, last_seq, updated_at) VALUES ($1, $2::xid8, $3, now())
                       ON CONFLICT (name) DO UPDATE SET last_txid = EXCLUDED.last_txid,
                           last_seq = EXCLUDED.last_seq, updated_at = now()""",
                    self.name,
                    last["txid"],
                    last["seq"],
                )
            if letters:
                await conn.execute("DELETE FROM credit_outbox WHERE id = ANY($1::bigint[])", [x["id"] for x in letters])
        self.published += len(rows) + len(letters)
        return len(rows) + len(letters)
