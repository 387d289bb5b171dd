"""Admission holds in PostgreSQL (migrations/0009): credits reserved for a call before it starts.

The database checks availability under the account's lock (trigger holds_admit), so a hold is safe
across any number of callers. A hold has no expiry (migrations/0014): only its event's decision (a
trigger, migrations/0011) or `release_hold` ends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg

from billing.policy import CreditError
from schemas.events import ModelCallCompleted

# The channel the outcome relay (services.credits.relay.CHANNEL) listens on: a commit that leaves
# something to publish notifies it, so it does not wait for its next poll.
OUTBOX_CHANNEL = "credit_outcomes"


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


class AdmissionHolds:
    """Places, releases and reports admission holds; the base of `Ledger`, which settles them."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

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
        released: int | None
        if user_id is None:
            released = await self.pool.fetchval("DELETE FROM holds WHERE event_id = $1 RETURNING credits", event_id)
        else:
            released = await self.pool.fetchval(
                "DELETE FROM holds WHERE event_id = $1 AND user_id = $2 RETURNING credits", event_id, user_id
            )
        return released

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
