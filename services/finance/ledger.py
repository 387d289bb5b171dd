"""The PostgreSQL side of finance: the window's events as a temporary table, one set-based comparison
with the ledger, correction entries, and the scratch schema of a replay.

Set-based on purpose: the events are COPied into a temporary table and compared with the ledger in
one statement, so a million events cost one join, not a million queries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
import asyncpg

from services.finance.assessment import EVENT_COLUMNS
from services.finance.differences import Correction, Difference, Kind, classify
from services.finance.window import Window

EVENTS_TABLE = "finance_events"

_CREATE_EVENTS = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {EVENTS_TABLE} (
    event_id uuid NOT NULL, user_id text NOT NULL, occurred_at timestamptz NOT NULL,
    decision text NOT NULL, credits bigint NOT NULL, price_list_version text, reason text,
    provider text, model text, feature text, key_source text, status text,
    part int NOT NULL, "off" bigint NOT NULL
)"""

# One row per (event, account) that is not clean. `ev` keeps the first delivery of each event id
# (log order), as the credit service does; `led` is every ledger entry of those events or of the
# window, netted per (event, account); `known` tells an entry on the wrong account from one with no
# event at all.
_COMPARE = f"""
WITH ev AS MATERIALIZED (
    SELECT DISTINCT ON (event_id) * FROM {EVENTS_TABLE} ORDER BY event_id, part, "off"
), ids AS (
    SELECT l.entry_id FROM ledger_entries l WHERE l.event_id IN (SELECT event_id FROM ev)
    UNION
    SELECT l.entry_id FROM ledger_entries l WHERE l.occurred_at >= $1 AND l.occurred_at < $2
), led AS (
    SELECT coalesce(l.event_id, l.entry_id) AS event_key, l.user_id,
           sum(l.credits)::bigint AS net,
           count(*) AS entries,
           count(*) FILTER (WHERE l.credits > 0) AS debits,
           count(*) FILTER (WHERE l.kind = 'correction') AS corrections,
           max(l.decision) FILTER (WHERE l.kind = 'decision') AS decision,
           max(l.price_list_version) FILTER (WHERE l.kind = 'decision') AS plv,
           min(l.occurred_at) AS occurred_at,
           max(l.provider) AS provider, max(l.model) AS model, max(l.feature) AS feature,
           max(l.key_source) AS key_source, max(l.status) AS status
      FROM ledger_entries l JOIN ids USING (entry_id)
     GROUP BY 1, 2
)
SELECT ev.event_id, ev.user_id, ev.occurred_at, ev.decision, ev.credits, ev.price_list_version,
       ev.provider, ev.model, ev.feature, ev.key_source, ev.status, ev.part, ev."off",
       led.event_key, led.user_id AS led_user, led.net, led.entries, led.debits, led.corrections,
       led.decision AS led_decision, led.plv AS led_plv, led.occurred_at AS led_occurred_at,
       led.provider AS led_provider, led.model AS led_model, led.feature AS led_feature,
       led.key_source AS led_key_source, led.status AS led_status,
       (known.event_id IS NOT NULL) AS event_in_window
  FROM ev
  FULL JOIN led ON led.event_key = ev.event_id AND led.user_id = ev.user_id
  LEFT JOIN ev AS known ON ev.event_id IS NULL AND known.event_id = led.event_key
 WHERE coalesce(led.net, 0) <> coalesce(ev.credits, 0)
 ORDER BY coalesce(ev.occurred_at, led.occurred_at), coalesce(ev.event_id, led.event_key)
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

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def check_schema_name(name: str) -> str:
    if not _SCHEMA_NAME.match(name):
        raise ValueError(f"{name!r} is not a plain schema name (lower case letters, digits, _)")
    return name


async def create_events_table(conn: asyncpg.Connection) -> None:
    await conn.execute(_CREATE_EVENTS)
    await conn.execute(f"TRUNCATE {EVENTS_TABLE}")


async def copy_events(conn: asyncpg.Connection, rows: list[tuple]) -> None:
    await conn.copy_records_to_table(EVENTS_TABLE, records=rows, columns=EVENT_COLUMNS, schema_name="pg_temp")


def _difference(row: asyncpg.Record) -> Difference | None:
    has_event = row["event_id"] is not None
    kind = classify(
        row["decision"], row["credits"], row["net"] or 0, row["debits"] or 0,
        event_in_window=row["event_in_window"],
    )
    if kind is None:
        return None
    pick = (lambda a, b: row[a] if has_event else row[b])
    return Difference(
        kind=kind,
        event_id=row["event_id"] if has_event else row["event_key"],
        user_id=row["user_id"] if has_event else row["led_user"],
        occurred_at=pick("occurred_at", "led_occurred_at"),
        expected_decision=row["decision"],
        expected_credits=row["credits"],
        ledger_decision=row["led_decision"],
        ledger_credits=row["net"] or 0,
        ledger_entries=row["entries"] or 0,
        ledger_debits=row["debits"] or 0,
        ledger_corrections=row["corrections"] or 0,
        price_list_version=row["price_list_version"],
        ledger_price_list_version=row["led_plv"],
        provider=pick("provider", "led_provider"),
        model=pick("model", "led_model"),
        feature=pick("feature", "led_feature"),
        key_source=pick("key_source", "led_key_source"),
        status=pick("status", "led_status"),
        partition=row["part"],
        offset=row["off"],
    )


async def compare(conn: asyncpg.Connection, window: Window) -> list[Difference]:
    """Every (event, account) of the events table and of the window's ledger entries that differs."""
    # A bounded, generous work_mem keeps the hash joins of a large window in memory.
    async with conn.transaction():
        await conn.execute("SET LOCAL work_mem = '256MB'")
        rows = await conn.fetch(_COMPARE, window.start, window.end)
    return [d for d in map(_difference, rows) if d is not None]


async def ledger_entry_count(conn: asyncpg.Connection, window: Window) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE occurred_at >= $1 AND occurred_at < $2",
        window.start, window.end,
    )


async def write_corrections(conn: asyncpg.Connection, corrections: list[Correction]) -> int:
    """Append the corrections (one statement, one transaction); return how many were new."""
    if not corrections:
        return 0
    cols = list(zip(*[
        (c.entry_id, c.event_id, c.user_id, c.credits, c.price_list_version, c.reason, c.provider,
         c.model, c.feature, c.key_source, c.status, c.occurred_at)
        for c in corrections
    ]))
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO accounts (user_id) SELECT DISTINCT unnest($1::text[]) ON CONFLICT DO NOTHING",
            list(cols[2]),
        )
        written = await conn.fetch(_INSERT_CORRECTIONS, *map(list, cols))
    return len(written)


# --- replay -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BalanceDifference:
    user_id: str
    live_granted: int
    live_debited: int
    live_balance: int
    replay_granted: int
    replay_debited: int
    replay_balance: int

    @property
    def delta(self) -> int:
        return self.live_balance - self.replay_balance

    def as_row(self) -> dict:
        return {**self.__dict__, "delta": self.delta}


async def scratch_is_empty(conn: asyncpg.Connection, scratch: str) -> bool:
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{ident(scratch)}.ledger_entries")
    if not exists:
        return True
    return not await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {ident(scratch)}.ledger_entries) OR EXISTS (SELECT 1 FROM {ident(scratch)}.grants)"
    )


async def build_replay(conn: asyncpg.Connection, live: str, scratch: str) -> int:
    """Fill `scratch` (migrated, empty) from the events table and the live grants; return entries."""
    s, lv = ident(scratch), ident(live)
    if await conn.fetchval("SELECT current_schema()") != scratch:
        raise RuntimeError("build_replay needs a connection whose search_path starts with the scratch schema")
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {s}.accounts (user_id, created_at) SELECT user_id, created_at FROM {lv}.accounts")
        await conn.execute(
            f"INSERT INTO {s}.accounts (user_id) SELECT DISTINCT user_id FROM {EVENTS_TABLE} ON CONFLICT DO NOTHING"
        )
        # Grants are not events: they are taken as they stand in the live ledger.
        await conn.execute(
            f"INSERT INTO {s}.grants (grant_key, user_id, plan, credits, granted_at) "
            f"SELECT grant_key, user_id, plan, credits, granted_at FROM {lv}.grants"
        )
        # Every event gets its decision, rejected ones too (0 credits), as the credit service does.
        status = await conn.execute(f"""
            INSERT INTO {s}.ledger_entries (entry_id, event_id, kind, user_id, decision, credits,
                price_list_version, reason, provider, model, feature, key_source, status, occurred_at)
            SELECT DISTINCT ON (event_id) event_id, event_id, 'decision', user_id, decision, credits,
                   price_list_version, reason, provider, model, feature, key_source, status, occurred_at
              FROM {EVENTS_TABLE}
             ORDER BY event_id, part, "off"
        """)
    return int(status.split()[-1])


async def compare_balances(conn: asyncpg.Connection, live: str, scratch: str) -> tuple[int, list[BalanceDifference]]:
    """(accounts compared, accounts whose live sums differ from the replayed ones)."""
    rows = await conn.fetch(f"""
        SELECT coalesce(l.user_id, r.user_id) AS user_id,
               coalesce(l.granted, 0) AS lg, coalesce(l.debited, 0) AS ld, coalesce(l.balance, 0) AS lb,
               coalesce(r.granted, 0) AS rg, coalesce(r.debited, 0) AS rd, coalesce(r.balance, 0) AS rb
          FROM {ident(live)}.accounts l FULL JOIN {ident(scratch)}.accounts r USING (user_id)
    """)
    diffs = [
        BalanceDifference(r["user_id"], r["lg"], r["ld"], r["lb"], r["rg"], r["rd"], r["rb"])
        for r in rows
        if (r["lg"], r["ld"]) != (r["rg"], r["rd"])
    ]
    return len(rows), sorted(diffs, key=lambda d: d.user_id)
