"""The PostgreSQL side of a reconciliation: the window's events as a temporary table, one set-based
comparison with the ledger, and correction entries (a replay's scratch schema: services.finance.scratch;
holds: services.finance.holds).

Set-based on purpose: the events are COPied into a temporary table and compared with the ledger in
one statement, so a million events cost one join, not a million queries.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from uuid import UUID

import asyncpg

from services.finance.assessment import EVENT_COLUMNS, EventRow, Shape
from services.finance.differences import Correction, Difference, classify
from services.finance.window import Window

EVENTS_TABLE = "finance_events"

# Connection settings for finance's sessions: the window's events stay in memory (temp_buffers),
# the joins hash in memory (work_mem), and JIT compilation, which costs more than it saves on
# these few large statements, is off.
SESSION_SETTINGS = {"temp_buffers": "1GB", "work_mem": "256MB", "jit": "off"}

_CREATE_EVENTS = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {EVENTS_TABLE} (
    event_id uuid NOT NULL, user_id text NOT NULL, occurred_at timestamptz NOT NULL,
    shape int NOT NULL, credits bigint NOT NULL, part int NOT NULL, "off" bigint NOT NULL
)"""

# One row per (event, account) that is not clean. The events table holds each event of the window
# once; `led` nets every ledger entry of those events, or of the window, per (event, account). The
# two branches are disjoint (an entry's event is in the table or it is not), so no de-duplication.
_COMPARE = f"""
WITH led AS (
    SELECT coalesce(l.event_id, l.entry_id) AS event_key, l.user_id,
           sum(l.credits)::bigint AS net,
           count(*) AS entries,
           count(*) FILTER (WHERE l.credits > 0) AS debits,
           count(*) FILTER (WHERE l.kind = 'correction') AS corrections,
           min(l.occurred_at) AS occurred_at
      FROM (
            SELECT l.entry_id, l.event_id, l.user_id, l.credits, l.kind, l.occurred_at
              FROM ledger_entries l JOIN {EVENTS_TABLE} e ON e.event_id = l.event_id
            UNION ALL
            SELECT l.entry_id, l.event_id, l.user_id, l.credits, l.kind, l.occurred_at
              FROM ledger_entries l
             WHERE l.occurred_at >= $1 AND l.occurred_at < $2
               AND NOT EXISTS (SELECT 1 FROM {EVENTS_TABLE} e WHERE e.event_id = l.event_id)
           ) l
     GROUP BY 1, 2
)
SELECT ev.event_id, ev.user_id, ev.occurred_at, ev.shape, ev.credits, ev.part, ev."off",
       led.event_key, led.user_id AS led_user, led.net, led.entries, led.debits, led.corrections,
       led.occurred_at AS led_occurred_at
  FROM {EVENTS_TABLE} ev
  FULL JOIN led ON led.event_key = ev.event_id AND led.user_id = ev.user_id
 WHERE coalesce(led.net, 0) <> coalesce(ev.credits, 0)
 ORDER BY coalesce(ev.occurred_at, led.occurred_at), coalesce(ev.event_id, led.event_key)
"""

# What the ledger says about the (few) entries of the differences, for the report.
_DETAILS = """
SELECT DISTINCT ON (coalesce(event_id, entry_id), user_id)
       coalesce(event_id, entry_id) AS event_key, user_id, decision, price_list_version, provider, model,
       feature, key_source, status
  FROM ledger_entries
 WHERE event_id = ANY($1::uuid[]) OR entry_id = ANY($1::uuid[])
 ORDER BY coalesce(event_id, entry_id), user_id, (kind = 'decision') DESC, recorded_at
"""

_INSERT_CORRECTIONS = """
INSERT INTO ledger_entries (entry_id, event_id, kind, user_id, decision, credits, price_list_version,
                            reason, provider, model, feature, key_source, status, occurred_at)
SELECT c.entry_id, c.event_id, 'correction', c.user_id, 'correction', c.credits, c.plv,
       c.reason, c.provider, c.model, c.feature, c.key_source, c.status, c.occurred_at
  FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[],
              $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[])
       AS c(entry_id, event_id, user_id, credits, plv, reason, provider, model, feature, key_source,
            status, occurred_at)
ON CONFLICT (entry_id) DO NOTHING
RETURNING entry_id
"""


async def create_events_table(conn: asyncpg.Connection) -> None:
    await conn.execute(_CREATE_EVENTS)
    await conn.execute(f"TRUNCATE {EVENTS_TABLE}")


async def copy_events(conn: asyncpg.Connection, rows: list[EventRow]) -> None:
    await conn.copy_records_to_table(EVENTS_TABLE, records=rows, columns=EVENT_COLUMNS, schema_name="pg_temp")


def _difference(row: asyncpg.Record, shapes: list[Shape], has_event: Callable[[UUID], bool]) -> Difference | None:
    shape = shapes[row["shape"]] if row["event_id"] is not None else None
    kind = classify(
        shape.decision if shape else None,
        row["credits"],
        row["net"] or 0,
        row["debits"] or 0,
        event_in_window=shape is None and has_event(row["event_key"]),
    )
    if kind is None:
        return None
    return Difference(
        kind=kind,
        event_id=row["event_id"] if shape else row["event_key"],
        user_id=row["user_id"] if shape else row["led_user"],
        occurred_at=row["occurred_at"] if shape else row["led_occurred_at"],
        expected_decision=shape and shape.decision,
        expected_credits=row["credits"],
        ledger_credits=row["net"] or 0,
        ledger_entries=row["entries"] or 0,
        ledger_debits=row["debits"] or 0,
        ledger_corrections=row["corrections"] or 0,
        price_list_version=shape and shape.price_list_version,
        provider=shape and shape.provider,
        model=shape and shape.model,
        feature=shape and shape.feature,
        key_source=shape and shape.key_source,
        status=shape and shape.status,
        partition=row["part"],
        offset=row["off"],
    )


async def compare(
    conn: asyncpg.Connection, window: Window, shapes: list[Shape], has_event: Callable[[UUID], bool]
) -> list[Difference]:
    """Every (event, account) of the events table and of the window's ledger entries that differs.

    `shapes` are the events' shapes (by number); `has_event(id)` says whether an id is an event of
    the window (to tell an entry on the wrong account from one with no event).
    """
    rows = await conn.fetch(_COMPARE, window.start, window.end)
    diffs = [d for d in (_difference(r, shapes, has_event) for r in rows) if d is not None]
    keys = [d.event_id for d in diffs if d.ledger_entries]
    if keys:
        details = {(r["event_key"], r["user_id"]): r for r in await conn.fetch(_DETAILS, keys)}
        for d in diffs:
            r = details.get((d.event_id, d.user_id))
            if r is None:
                continue
            d.ledger_decision, d.ledger_price_list_version = r["decision"], r["price_list_version"]
            if d.expected_decision is None:  # no event: describe the call as the ledger has it
                d.provider, d.model, d.feature = r["provider"], r["model"], r["feature"]
                d.key_source, d.status = r["key_source"], r["status"]
    return diffs


async def last_recorded_at(conn: asyncpg.Connection, window: Window) -> datetime | None:
    """When the newest ledger entry of the window was written. Its event was in the log by then: the
    credit service decides only what it has read, and finance corrects only what it has read."""
    newest: datetime | None = await conn.fetchval(
        "SELECT max(recorded_at) FROM ledger_entries WHERE occurred_at >= $1 AND occurred_at < $2",
        window.start,
        window.end,
    )
    return newest


async def ledger_entry_count(conn: asyncpg.Connection, window: Window) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE occurred_at >= $1 AND occurred_at < $2",
        window.start,
        window.end,
    )
    return count


async def write_corrections(conn: asyncpg.Connection, corrections: list[Correction]) -> int:
    """Append the corrections (one statement, one transaction); return how many were new."""
    if not corrections:
        return 0
    cols = list(
        zip(
            *[
                (
                    c.entry_id,
                    c.event_id,
                    c.user_id,
                    c.credits,
                    c.price_list_version,
                    c.reason,
                    c.provider,
                    c.model,
                    c.feature,
                    c.key_source,
                    c.status,
                    c.occurred_at,
                )
                for c in corrections
            ],
            strict=True,
        )
    )
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO accounts (user_id) SELECT DISTINCT unnest($1::text[]) ON CONFLICT DO NOTHING",
            list(cols[2]),
        )
        written = await conn.fetch(_INSERT_CORRECTIONS, *map(list, cols))
    return len(written)
