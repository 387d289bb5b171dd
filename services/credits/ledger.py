"""The ledger in PostgreSQL: decisions, grants and balances.

One transaction per batch, set-based: a handful of statements whatever the batch size. The event id is
the ledger entry's primary key, so an event redelivered, duplicated or replayed is decided once; the
database refuses a second decision even if two consumers race (see migrations/0001).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple
from uuid import UUID

import asyncpg

from billing.policy import Charge, CreditError
from schemas.events import Decision, ModelCallCompleted
from schemas.topics import dlq
from services.shared.kafka import DeadLetter

# The channel the outcome relay (services.credits.relay.CHANNEL) listens on: a commit that leaves
# something to publish notifies it, so it does not wait for its next poll.
OUTBOX_CHANNEL = "credit_outcomes"

LEDGER_COLUMNS = (
    "entry_id",
    "event_id",
    "kind",
    "user_id",
    "decision",
    "credits",
    "price_list_version",
    "reason",
    "provider",
    "model",
    "feature",
    "key_source",
    "status",
    "occurred_at",
    "balance_after",
)


class Decided(NamedTuple):
    """An event and what the policy says it owes; `raw` is kept to dead-letter a rejected event.

    A tuple rather than a frozen dataclass: one is built per event, and a frozen dataclass's
    __init__ costs several times as much.
    """

    event: ModelCallCompleted
    charge: Charge
    raw: bytes | None = None
    source_topic: str = ""
    source_partition: int = -1
    source_offset: int = -1


def decision_row(e: ModelCallCompleted, c: Charge, balance_after: int) -> tuple:
    """The ledger row of one decided event, in LEDGER_COLUMNS order (the COPY layout).

    The enums are str subclasses: passed as they are, they are written as their values.
    """
    return (
        e.event_id,
        e.event_id,
        "decision",
        e.user_id,
        c.decision,
        c.credits,
        c.price_list_version,
        c.reason,
        e.provider,
        e.model,
        e.feature,
        e.key_source,
        e.status,
        e.occurred_at,
        balance_after,
    )


# What makes two events with one id the same call (DESIGN.md "Same id, other content"): whose account,
# what ran, on whose key, and whether it succeeded, i.e. everything the policy charges by and whom it
# charges. An event re-sent with the same identity is a duplicate even if its occurred_at, latency,
# tokens, session/request ids or ending differ (a retry re-stamps those; the policy does not charge by
# them); one with another identity is a conflict: the first decision stands, the other goes to the DLQ.
IDENTITY_FIELDS = ("user_id", "feature", "model", "key_source", "provider", "status")
CONFLICT = "conflict"  # the dead letters' dlq.error_type


def identity(event: ModelCallCompleted) -> tuple:
    """The event's IDENTITY_FIELDS, in order (enums as they are: a member equals its stored value)."""
    return (event.user_id, event.feature, event.model, event.key_source, event.provider, event.status)


def conflicting(prior: tuple | ModelCallCompleted | None, event: ModelCallCompleted) -> str:
    """'' when `event` is the same call as `prior`, else what differs.

    `prior` is an earlier event of the batch, or the identity of its ledger row (None for an entry that
    is not a decision: its id is not an event's). A ledger field that is NULL (a row written without
    it, e.g. by hand) is not held against the event.
    """
    if prior is None:
        return ""
    before = identity(prior) if isinstance(prior, ModelCallCompleted) else prior
    now = identity(event)
    if before == now:  # the usual redelivery: one tuple comparison
        return ""
    return ", ".join(
        f"{name} {b!s} (decided) vs {n!s}"
        for name, b, n in zip(IDENTITY_FIELDS, before, now, strict=True)
        if b is not None and b != n
    )


@dataclass(frozen=True)
class Recorded:
    new: int
    duplicates: int
    debited: int
    credits: int
    rejected: int
    conflicts: int = 0  # same event id, another identity: dead-lettered as `conflict`


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


@dataclass(frozen=True)
class Hold:
    event_id: UUID
    user_id: str
    credits: int
    price_list_version: str
    created: bool  # False: the same hold was placed before
    available: int  # after this hold


@dataclass(frozen=True)
class HoldStats:
    open: int
    credits: int
    oldest_age_s: float  # 0 when no hold is open


class InsufficientAvailable(CreditError):
    def __init__(self, needed: int, available: int):
        super().__init__(f"this call needs {needed} credits and {available} are available")
        self.needed, self.available = needed, available


class HoldConflict(CreditError):
    """The event is already decided, or its id is held for another user or another price."""


class LedgerBusy(CreditError):
    """The account stayed locked longer than a hold may wait (migrations/0013); nothing was held."""


class GrantConflict(CreditError):
    """A grant key already used for a different grant."""


def _letter_row(letter: DeadLetter) -> tuple:
    # jsonb takes no NUL: an error text quoting a bad record must not make its own dead letter unwritable.
    headers = {k: v.decode(errors="replace").replace("\x00", "\ufffd") for k, v in letter.headers()}
    return (dlq(letter.topic), letter.key, letter.value or b"", json.dumps(headers))


class Ledger:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def record(self, decided: list[Decided], letters: list[DeadLetter] = ()) -> Recorded:
        """Write the decisions not yet in the ledger and the dead letters, in one transaction.

        An event whose id is already decided (in the ledger, or earlier in this batch) is a duplicate
        when its identity (IDENTITY_FIELDS) is the same, and changes nothing; with another identity it
        is a conflict: dead-lettered with reason `conflict`, the first decision standing.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            users = sorted({d.event.user_id for d in decided})
            fresh: list[tuple] = []
            rejected_letters: list[DeadLetter] = []
            conflict_letters: list[DeadLetter] = []
            debited = credits = 0
            if users:
                balances = await self._lock_accounts(conn, users)
                # unnest joined to the key, not "= ANY(array)": with thousands of ids the planner
                # would otherwise scan the whole (ever-growing) ledger. Only redeliveries come back, so
                # fetching their identity costs nothing on the usual batch (no row at all).
                seen: dict[UUID, tuple | ModelCallCompleted | None] = {
                    r[0]: tuple(r[2:]) if r[1] == "decision" else None
                    for r in await conn.fetch(
                        f"SELECT l.entry_id, l.kind, {', '.join('l.' + f for f in IDENTITY_FIELDS)} "
                        "FROM unnest($1::uuid[]) AS u(id) JOIN ledger_entries l ON l.entry_id = u.id",
                        [d.event.event_id for d in decided],
                    )
                }
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

    # --- admission holds (migrations/0009) -------------------------------------------------------

    async def place_hold(
        self,
        event_id: UUID,
        user_id: str,
        credits: int,
        price_list_version: str,
        *,
        feature: str,
        provider: str,
        model: str,
    ) -> Hold:
        """Reserve `credits` for the call `event_id`; placing the same hold again returns it.

        The database checks availability under the account's lock (trigger holds_admit), so this
        holds across any number of callers; it raises InsufficientAvailable or HoldConflict. A hold has
        no expiry (migrations/0014): only its event's decision or release_hold ends it.
        """
        async with self.pool.acquire() as conn:
            return await self._place_hold(
                conn, event_id, user_id, credits, price_list_version, feature, provider, model
            )

    async def _place_hold(
        self,
        conn: asyncpg.Connection,
        event_id: UUID,
        user_id: str,
        credits: int,
        price_list_version: str,
        feature: str,
        provider: str,
        model: str,
    ) -> Hold:
        try:
            row = await conn.fetchrow(
                "SELECT * FROM place_hold($1, $2, $3, $4, $5, $6, $7)",
                event_id,
                user_id,
                credits,
                feature,
                provider,
                model,
                price_list_version,
            )
        except asyncpg.CheckViolationError as exc:
            raise self._refusal(exc, credits) from None
        except asyncpg.ForeignKeyViolationError:
            raise InsufficientAvailable(credits, 0) from None
        except asyncpg.LockNotAvailableError:
            raise LedgerBusy(f"the account of {user_id} stayed locked; no hold was placed") from None
        if row["holder"] is None:  # placed and released again in between
            raise HoldConflict(f"the hold of event {event_id} was released while it was being placed")
        if row["holder"] != user_id or row["held_credits"] != credits:
            raise HoldConflict(f"event {event_id} is already held for a different call")
        return Hold(event_id, user_id, credits, price_list_version, row["created"], row["available"])

    async def hold_and_record(self, event: ModelCallCompleted, topic: str, hold: tuple[int, str] | None) -> Hold | None:
        """Place the hold of a call (`hold`: its credits and price-list version; None for a call that is
        not billable) and put the call's event in the outbox, in one transaction.

        Both or neither: a hold is never left without the event whose decision releases it, and an
        event that may debit is never published without its hold. The outcome relay publishes the
        event to `topic` (keyed by user, like the chat's) once Kafka takes it, so an outage of Kafka
        delays the decision and loses nothing. Placing the same hold again records nothing more (its
        event was recorded with it). Raises as place_hold does; HoldConflict with `already_decided`
        when the event was decided meanwhile.
        """
        e = event
        async with self.pool.acquire() as conn, conn.transaction():
            placed = None
            if hold is not None:
                credits, version = hold
                placed = await self._place_hold(
                    conn, e.event_id, e.user_id, credits, version, e.feature.value, e.provider.value, e.model
                )
                if not placed.created:
                    same = await conn.fetchval(
                        "SELECT feature = $2 AND provider = $3 AND model = $4 FROM holds WHERE event_id = $1",
                        e.event_id,
                        e.feature.value,
                        e.provider.value,
                        e.model,
                    )
                    if not same:
                        raise HoldConflict(f"event {e.event_id} is already held for a different call")
                    return placed
            await conn.execute(
                "INSERT INTO credit_outbox (topic, key, payload) VALUES ($1, $2, $3)",
                topic,
                e.user_id.encode(),
                e.to_json(),
            )
            await conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)  # wakes the relay at commit
        return placed

    @staticmethod
    def _refusal(exc: asyncpg.CheckViolationError, credits: int) -> CreditError:
        hint = getattr(exc, "hint", None)
        if hint == "insufficient_credits":
            detail = getattr(exc, "detail", "") or ""
            available = int(detail.split("=", 1)[1]) if detail.startswith("available=") else 0
            return InsufficientAvailable(credits, available)
        if hint == "already_decided":
            return HoldConflict(str(exc))
        return HoldConflict(str(exc))

    async def release_hold(self, event_id: UUID, user_id: str | None = None) -> int | None:
        """Release a hold (of `user_id`, unless None); the credits it held, or None if there was none."""
        if user_id is None:
            return await self.pool.fetchval("DELETE FROM holds WHERE event_id = $1 RETURNING credits", event_id)
        return await self.pool.fetchval(
            "DELETE FROM holds WHERE event_id = $1 AND user_id = $2 RETURNING credits", event_id, user_id
        )

    async def old_holds(self, older_than_s: float, limit: int = 1000) -> tuple[int, list[asyncpg.Record]]:
        """Holds placed more than `older_than_s` ago, oldest first: (how many in all, the first `limit`).

        A hold has no expiry (migrations/0014), so one whose event never comes stays until someone looks:
        this is where operators look. `decided` true would be a leak the database should make impossible.
        """
        async with self.pool.acquire() as conn:
            total = await conn.fetchval(
                "SELECT count(*) FROM holds WHERE placed_at < now() - make_interval(secs => $1)", older_than_s
            )
            rows = await conn.fetch(
                """SELECT h.event_id, h.user_id, h.credits, h.feature, h.provider, h.model, h.price_list_version,
                          h.placed_at, extract(epoch FROM now() - h.placed_at)::float8 AS age_s,
                          EXISTS (SELECT 1 FROM ledger_entries l WHERE l.entry_id = h.event_id) AS decided
                     FROM holds h
                    WHERE h.placed_at < now() - make_interval(secs => $1)
                    ORDER BY h.placed_at, h.event_id
                    LIMIT $2""",
                older_than_s,
                limit,
            )
        return total, list(rows)

    async def hold_stats(self) -> HoldStats:
        """Every open hold at once: how many, the credits they hold, the age of the oldest."""
        row = await self.pool.fetchrow(
            """SELECT count(*) AS n, coalesce(sum(credits), 0)::bigint AS credits,
                      coalesce(extract(epoch FROM now() - min(placed_at)), 0)::float8 AS oldest_s
                 FROM holds"""
        )
        return HoldStats(row["n"], row["credits"], row["oldest_s"])

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
