"""Admission holds as finance sees them (migrations/0009, 0014).

A hold is settled by the transaction that decides its event (a trigger, migrations/0011) or released
by DELETE /api/holds/{event_id}; it has no expiry (migrations/0014), since its event may still come
however late. A hold of an event already decided is a leak (it keeps credits from the user): zero after
a clean run, and repair releases it. A hold open for long is only reported: it may be a call whose
event waits in an outbox (Kafka or the credit service down), so no tool releases it by age.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg


async def stale_holds(conn: asyncpg.Connection, older_than_s: float) -> dict[str, list[asyncpg.Record]]:
    """Holds of events the ledger has already decided, and undecided holds placed over `older_than_s` ago."""
    rows = await conn.fetch(
        """SELECT h.event_id, h.user_id, h.credits, h.feature, h.provider, h.model, h.placed_at,
                  extract(epoch FROM now() - h.placed_at)::float8 AS age_s,
                  EXISTS (SELECT 1 FROM ledger_entries l WHERE l.entry_id = h.event_id) AS decided
             FROM holds h
            WHERE h.placed_at < now() - make_interval(secs => $1)
               OR EXISTS (SELECT 1 FROM ledger_entries l WHERE l.entry_id = h.event_id)
            ORDER BY h.placed_at, h.event_id""",
        older_than_s,
    )
    return {"decided": [r for r in rows if r["decided"]], "old": [r for r in rows if not r["decided"]]}


async def release_holds(conn: asyncpg.Connection, event_ids: list[UUID]) -> int:
    """Release the given holds (never a debit); returns how many were still there."""
    if not event_ids:
        return 0
    async with conn.transaction():
        # Accounts locked in the ledger writer's order, so the two never deadlock.
        await conn.execute(
            """SELECT 1 FROM accounts WHERE user_id IN (
                                  SELECT user_id FROM holds WHERE event_id = ANY($1::uuid[]))
                              ORDER BY user_id FOR UPDATE""",
            event_ids,
        )
        released = await conn.fetch("DELETE FROM holds WHERE event_id = ANY($1::uuid[]) RETURNING 1", event_ids)
    return len(released)
