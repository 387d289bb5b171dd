"""The ledger in PostgreSQL: decisions, grants and balances (admission holds: services.credits.holds).

One transaction per batch, set-based: a handful of statements whatever the batch size. The event id is
the ledger entry's primary key, so an event redelivered, duplicated or replayed is decided once; the
database refuses a second decision even if two consumers race (see migrations/0001).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from billing.policy import CreditError
from schemas.events import Decision, ModelCallCompleted
from schemas.topics import dlq
from services.credits import metrics
from services.credits.decisions import (
    CONFLICT,
    IDENTITY_FIELDS,
    LEDGER_COLUMNS,
    Decided,
    IdentityValues,
    LedgerRow,
    Recorded,
    conflicting,
    decision_row,
)
from services.credits.holds import AdmissionHolds
from services.shared.kafka import DeadLetter

# What refuses a second decision for one event: the key (a decision's entry_id is its event_id).
_DECISION_KEY = "ledger_entries_pkey"

# What bench/credits.py writes the ledger with, besides the Ledger.
__all__ = ["LEDGER_COLUMNS", "Balance", "GrantConflict", "Ledger", "decision_row"]


@dataclass(frozen=True)
class Balance:
    user_id: str
    granted: int
    debited: int
    balance: int
    held: int = 0

    @property
    def available(self) -> int:
        return self.balance - self.held


class GrantConflict(CreditError):
    """A grant key already used for a different grant."""


def _letter_row(letter: DeadLetter) -> tuple[str, bytes | None, bytes, str]:
    # jsonb takes no NUL: an error text quoting a bad record must not make its own dead letter unwritable.
    headers = {k: v.decode(errors="replace").replace("\x00", "\ufffd") for k, v in letter.headers()}
    return (dlq(letter.topic), letter.key, letter.value or b"", json.dumps(headers))


class Ledger(AdmissionHolds):
    # After a batch met an event already in the ledger, the next transactions look their ids up first
    # for this long: redeliveries come in runs (a rebalance, a restart), and each would otherwise cost a
    # refused COPY and a second transaction.
    LOOK_UP_AFTER_COLLISION_S = 30.0
    _look_up_until = 0.0

    async def record(self, decided: list[Decided], letters: Sequence[DeadLetter] = ()) -> Recorded:
        """Write the decisions not yet in the ledger and the dead letters, in one transaction.

        An event whose id is already decided (in the ledger, or earlier in this batch) is a duplicate
        when its identity (IDENTITY_FIELDS) is the same, and changes nothing; with another identity it
        is a conflict: dead-lettered with reason `conflict`, the first decision standing.

        Optimistic: the batch is first written as if none of its ids were in the ledger, and the primary
        key says otherwise. A lookup of every id before the COPY cost PostgreSQL about half as much as
        the COPY itself (issue 22) and finds nothing but after a redelivery. When the key refuses the
        COPY, the whole transaction is rolled back and written again with the lookup, so the running
        balances, holds and counts are those of the events really new.
        """
        if decided and time.monotonic() >= self._look_up_until:
            try:
                return await self._record(decided, letters, look_up=False)
            except asyncpg.UniqueViolationError as exc:
                # Written again with the lookup whatever key refused it: that way was always right, and
                # a refusal that is not a redelivery is refused again and reaches the pipeline.
                if exc.constraint_name == _DECISION_KEY:
                    self._look_up_until = time.monotonic() + self.LOOK_UP_AFTER_COLLISION_S
                    metrics.LEDGER_COLLISIONS.inc()
        return await self._record(decided, letters, look_up=True)

    async def _record(self, decided: list[Decided], letters: Sequence[DeadLetter], *, look_up: bool) -> Recorded:
        async with self.pool.acquire() as conn, conn.transaction():
            users = sorted({d.event.user_id for d in decided})
            fresh: list[LedgerRow] = []
            rejected_letters: list[DeadLetter] = []
            conflict_letters: list[DeadLetter] = []
            debited = credits = 0
            if users:
                balances = await self._lock_accounts(conn, users)
                # The ids decided so far (in the ledger, then earlier in this batch).
                seen = await self._already_decided(conn, decided) if look_up else {}
                for d in decided:
                    e, c = d.event, d.charge
                    if e.event_id in seen:
                        clash = conflicting(seen[e.event_id], e)
                        if clash:
                            conflict_letters.append(
                                DeadLetter(
                                    d.source_topic,
                                    d.source_partition,
                                    d.source_offset,
                                    e.user_id.encode(),
                                    d.raw,
                                    f"event {e.event_id} is already decided for another call: {clash}; "
                                    "the first decision stands",
                                    CONFLICT,
                                )
                            )
                        continue
                    seen[e.event_id] = e
                    balances[e.user_id] -= c.credits
                    if c.decision is Decision.DEBITED:
                        debited += 1
                        credits += c.credits
                    elif c.decision is Decision.REJECTED:
                        rejected_letters.append(
                            DeadLetter(
                                d.source_topic,
                                d.source_partition,
                                d.source_offset,
                                e.user_id.encode(),
                                d.raw,
                                c.reason or "rejected",
                                "unpriced_model",
                            )
                        )
                    fresh.append(decision_row(e, c, balances[e.user_id]))
                if fresh:
                    # Its triggers also wake the outcome relay at commit (migrations/0006) and release the
                    # admission holds of the events decided, whatever the decision (migrations/0011).
                    await conn.copy_records_to_table("ledger_entries", records=fresh, columns=LEDGER_COLUMNS)
            all_letters = list(letters) + rejected_letters + conflict_letters
            if all_letters:
                await conn.executemany(
                    "INSERT INTO credit_outbox (topic, key, payload, headers) VALUES ($1, $2, $3, $4::jsonb)",
                    [_letter_row(letter) for letter in all_letters],
                )
        return Recorded(
            len(fresh),
            len(decided) - len(fresh) - len(conflict_letters),
            debited,
            credits,
            len(rejected_letters),
            len(conflict_letters),
        )

    @staticmethod
    async def _already_decided(
        conn: asyncpg.Connection, decided: list[Decided]
    ) -> dict[UUID, IdentityValues | ModelCallCompleted | None]:
        """The ledger's entries among the batch's ids: a decision's identity, None for another entry."""
        # unnest joined to the key, not "= ANY(array)": with thousands of ids the planner would otherwise
        # scan the whole (ever-growing) ledger. Only redeliveries come back, so fetching their identity
        # costs nothing more.
        rows = await conn.fetch(
            f"SELECT l.entry_id, l.kind, {', '.join('l.' + f for f in IDENTITY_FIELDS)} "
            "FROM unnest($1::uuid[]) AS u(id) JOIN ledger_entries l ON l.entry_id = u.id",
            [d.event.event_id for d in decided],
        )
        return {r[0]: tuple(r[2:]) if r[1] == "decision" else None for r in rows}

    @staticmethod
    async def _lock_accounts(conn: asyncpg.Connection, users: list[str]) -> dict[str, int]:
        """Lock the users' accounts (creating the missing ones) and return their balances.

        Locked in a fixed order, so concurrent writers never deadlock, and so the running balances
        computed from them are the ones the triggers will produce.
        """
        lock = (
            "SELECT a.user_id, a.balance FROM unnest($1::text[]) AS u(id) JOIN accounts a ON a.user_id = u.id "
            "ORDER BY a.user_id FOR UPDATE OF a"
        )
        balances = dict(await conn.fetch(lock, users))
        missing = [u for u in users if u not in balances]
        if missing:
            await conn.execute(
                "INSERT INTO accounts (user_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", missing
            )
            balances.update(await conn.fetch(lock, missing))
        return balances

    async def balance(self, user_id: str) -> Balance:
        row = await self.pool.fetchrow(
            "SELECT granted, debited, balance, held FROM accounts WHERE user_id = $1", user_id
        )
        if row is None:
            return Balance(user_id, 0, 0, 0)
        return Balance(user_id, row["granted"], row["debited"], row["balance"], row["held"])

    async def grant(self, grant_key: str, user_id: str, plan: str, credits: int) -> tuple[bool, Balance]:
        """Add a grant once per `grant_key`; a repeat with the same terms is a no-op."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO accounts (user_id) VALUES ($1) ON CONFLICT DO NOTHING", user_id)
            created = await conn.fetchval(
                """INSERT INTO grants (grant_key, user_id, plan, credits) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (grant_key) DO NOTHING RETURNING true""",
                grant_key,
                user_id,
                plan,
                credits,
            )
            if not created:
                prior = await conn.fetchrow("SELECT user_id, plan, credits FROM grants WHERE grant_key = $1", grant_key)
                if (prior["user_id"], prior["plan"], prior["credits"]) != (user_id, plan, credits):
                    raise GrantConflict(
                        f"grant key {grant_key!r} was already used for {prior['credits']} credits "
                        f"({prior['plan']}) to {prior['user_id']}"
                    )
        return bool(created), await self.balance(user_id)

    async def decision_of(self, event_id: UUID) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            """SELECT event_id, user_id, decision, credits, balance_after, price_list_version, reason,
                      feature, model, key_source, provider
                 FROM ledger_entries WHERE entry_id = $1 AND kind = 'decision'""",
            event_id,
        )

    async def usage(self, user_id: str, limit: int = 50) -> tuple[list[asyncpg.Record], asyncpg.Record | None]:
        """The user's last `limit` decided calls, newest first, and their latest grant (or None)."""
        async with self.pool.acquire() as conn:
            calls = await conn.fetch(
                """SELECT occurred_at, recorded_at, feature, provider, model, key_source, status, decision, credits,
                          balance_after
                     FROM ledger_entries WHERE user_id = $1 AND kind = 'decision'
                    ORDER BY recorded_at DESC, occurred_at DESC LIMIT $2""",
                user_id,
                limit,
            )
            grant = await conn.fetchrow(
                "SELECT plan, credits, granted_at FROM grants WHERE user_id = $1 ORDER BY granted_at DESC LIMIT 1",
                user_id,
            )
        return list(calls), grant
