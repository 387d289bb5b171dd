"""The scratch schema of a replay: every event's decision rebuilt from the log, and the balances
compared with the live ones.

Set-based like the window's comparison (services.finance.ledger): the events are already in the
temporary events table, so filling the scratch ledger is a handful of statements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg

from services.finance.assessment import Shape
from services.finance.ledger import EVENTS_TABLE

SHAPES_TABLE = "finance_shapes"

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def check_schema_name(name: str) -> str:
    if not _SCHEMA_NAME.match(name):
        raise ValueError(f"{name!r} is not a plain schema name (lower case letters, digits, _)")
    return name


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

    def as_row(self) -> dict[str, object]:
        return {**self.__dict__, "delta": self.delta}


async def scratch_is_empty(conn: asyncpg.Connection, scratch: str) -> bool:
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{ident(scratch)}.ledger_entries")
    if not exists:
        return True
    return not await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {ident(scratch)}.ledger_entries) OR EXISTS (SELECT 1 FROM {ident(scratch)}.grants)"
    )


async def build_replay(conn: asyncpg.Connection, live: str, scratch: str, shapes: list[Shape]) -> int:
    """Fill `scratch` (migrated, empty) from the events table and the live grants; return entries."""
    s, lv = ident(scratch), ident(live)
    await conn.execute(f"""CREATE TEMPORARY TABLE IF NOT EXISTS {SHAPES_TABLE} (
        shape int PRIMARY KEY, decision text, credits bigint, price_list_version text, reason text,
        provider text, model text, feature text, key_source text, status text)""")
    await conn.execute(f"TRUNCATE {SHAPES_TABLE}")
    await conn.copy_records_to_table(
        SHAPES_TABLE,
        schema_name="pg_temp",
        records=[
            (
                i,
                sh.decision,
                sh.credits,
                sh.price_list_version,
                sh.reason,
                sh.provider,
                sh.model,
                sh.feature,
                sh.key_source,
                sh.status,
            )
            for i, sh in enumerate(shapes)
        ],
    )
    if await conn.fetchval("SELECT current_schema()") != scratch:
        raise RuntimeError("build_replay needs a connection whose search_path starts with the scratch schema")
    async with conn.transaction():
        await conn.execute(
            f"INSERT INTO {s}.accounts (user_id, created_at) SELECT user_id, created_at FROM {lv}.accounts"
        )
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
            SELECT e.event_id, e.event_id, 'decision', e.user_id, sh.decision, e.credits,
                   sh.price_list_version, sh.reason, sh.provider, sh.model, sh.feature, sh.key_source,
                   sh.status, e.occurred_at
              FROM {EVENTS_TABLE} e JOIN {SHAPES_TABLE} sh USING (shape)
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
