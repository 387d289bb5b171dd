"""Publishes what the ledger committed: a CreditOutcome per decision, and the dead letters.

Decision rows are their own outbox (see migrations/0002): the relay reads them past its cursor, sends
them, waits for Kafka's acks, and only then moves the cursor, in one database transaction. A crash
in between re-sends (consumers of `credit_ledger` dedupe by event_id); nothing is lost.
"""

from __future__ import annotations

import asyncio
import json
import logging

import asyncpg
from aiokafka import AIOKafkaProducer

from schemas.events import CreditOutcome, Decision

log = logging.getLogger(__name__)

_LOCK = 0x72656C79  # one relay at a time per database schema


class OutcomeRelay:
    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, outcome_topic: str,
                 *, batch: int = 5000, idle_poll_s: float = 0.2, name: str = "credit_outcomes"):
        self.pool, self.producer, self.topic = pool, producer, outcome_topic
        self.batch, self.idle_poll_s, self.name = batch, idle_poll_s, name
        self._wake = asyncio.Event()
        self.published = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                sent = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka or PostgreSQL away: keep trying, lose nothing
                log.warning("outcome relay: %s: %s; retrying", type(exc).__name__, exc)
                await asyncio.sleep(1)
                continue
            if sent < self.batch:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.idle_poll_s)
                except TimeoutError:
                    pass

    async def run_once(self) -> int:
        """Publish one batch; return how many messages were sent."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
                return 0
            cursor = await conn.fetchrow(
                "SELECT last_txid, last_seq FROM relay_cursors WHERE name = $1", self.name
            )
            last_txid, last_seq = (cursor["last_txid"], cursor["last_seq"]) if cursor else (0, 0)
            rows = await conn.fetch(
                """SELECT entry_id, user_id, decision, reason, credits, balance_after, price_list_version,
                          recorded_at, txid, seq
                     FROM ledger_entries
                    WHERE kind = 'decision' AND (txid, seq) > ($1::xid8, $2)
                      AND txid < pg_snapshot_xmin(pg_current_snapshot())
                    ORDER BY txid, seq LIMIT $3""",
                last_txid, last_seq, self.batch,
            )
            letters = await conn.fetch(
                "SELECT id, topic, key, payload, headers FROM credit_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self.batch,
            )
            if not rows and not letters:
                return 0
            futures = []
            for r in rows:
                outcome = CreditOutcome(
                    event_id=r["entry_id"], user_id=r["user_id"], decision=Decision(r["decision"]),
                    reason=r["reason"], credits=r["credits"], balance_after=r["balance_after"],
                    price_list_version=r["price_list_version"], decided_at=r["recorded_at"],
                )
                futures.append(await self.producer.send(self.topic, outcome.to_json(), key=r["user_id"].encode()))
            for letter in letters:
                headers = [(k, v.encode()) for k, v in json.loads(letter["headers"]).items()]
                futures.append(await self.producer.send(letter["topic"], letter["payload"], key=letter["key"], headers=headers))
            await asyncio.gather(*futures)
            if rows:
                last = rows[-1]
                await conn.execute(
                    """INSERT INTO relay_cursors (name, last_txid, last_seq, updated_at) VALUES ($1, $2::xid8, $3, now())
                       ON CONFLICT (name) DO UPDATE SET last_txid = EXCLUDED.last_txid,
                           last_seq = EXCLUDED.last_seq, updated_at = now()""",
                    self.name, last["txid"], last["seq"],
                )
            if letters:
                await conn.execute("DELETE FROM credit_outbox WHERE id = ANY($1::bigint[])", [x["id"] for x in letters])
        self.published += len(rows) + len(letters)
        return len(rows) + len(letters)
