"""Where a call's life is recorded: its idempotency row and its outbox row (PostgreSQL), and the leases
of the chat instances that run calls.

One statement writes a call's `chat_calls` row and its pending outbox row (the event to publish as
*failed* if the call never finishes), before any credits are held or any provider is asked. The relay
(`services/chat/outbox.py`) publishes a pending row only once the lease of the instance that runs it has
lapsed; see migrations/0015.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from schemas.events import ModelCallCompleted


@dataclass(frozen=True)
class Outcome:
    """How a call was answered: the HTTP status and JSON body a retry with the same key gets again."""

    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == 200


INTERRUPTED_STATUS = 503


def interrupted_body() -> dict[str, Any]:
    """The answer of a call whose instance went away before it ended: its event was published as failed
    (ending `interrupted`), so it is not charged, whatever it had shown."""
    return {
        "error": "interrupted",
        "message": "This call was interrupted: the server running it stopped before it ended. Nothing was "
        "charged. Send your message again as a new message.",
        "ending": "interrupted",
        "charged": False,
    }


@dataclass(frozen=True)
class CallRecord:
    """A call as the database knows it."""

    user_id: str
    idempotency_key: str
    request_hash: str
    event_id: UUID
    instance_id: UUID
    stream: bool
    outcome: Outcome | None  # None while it runs
    instance_alive: bool  # the instance running it still renews its lease


class CallStore:
    """Port: the call rows, the outbox rows, the instance leases."""

    async def claim(
        self, user_id: str, key: str, request_hash: str, instance_id: UUID, stream: bool, pending: ModelCallCompleted
    ) -> int | None:
        """Record a new call and its pending event in one transaction; the outbox handle, or None when
        the user already has a call with this key (then `find` it)."""
        raise NotImplementedError

    async def find(self, user_id: str, key: str) -> CallRecord | None:
        raise NotImplementedError

    async def finish(self, handle: int, event: ModelCallCompleted, outcome: Outcome) -> bool:
        """Turn the pending event into `event` (ready to publish) and end the call with `outcome`, in one
        transaction. False when the pending event had already been published (the lease lapsed): then
        nothing changes here, and the caller ends the call otherwise."""
        raise NotImplementedError

    async def end(self, event_id: UUID, outcome: Outcome) -> Outcome:
        """End a call whose event is already settled otherwise (its outcome only); the outcome it ends
        with: `outcome`, or the one already recorded (a write whose commit landed while its answer was
        lost to a dropped connection, then the relay took the event: that outcome is the true one)."""
        raise NotImplementedError

    async def forget(self, handle: int, user_id: str, key: str) -> None:
        """Remove a call refused before anything was held or asked (its key may be used again)."""
        raise NotImplementedError

    async def renew_lease(self, instance_id: UUID, lease_s: float) -> None:
        raise NotImplementedError

    async def end_lease(self, instance_id: UUID) -> None:
        """This instance stops: its remaining calls lapse at once."""
        raise NotImplementedError

    async def purge(self, answer_kept_s: float, call_kept_s: float) -> tuple[int, int]:
        """Drop answers older than `answer_kept_s` (billing kept) and calls older than `call_kept_s`;
        how many of each."""
        raise NotImplementedError


_CLAIM = """
WITH call AS (
    INSERT INTO chat_calls (user_id, idempotency_key, request_hash, event_id, instance_id, stream)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT DO NOTHING
    RETURNING event_id)
INSERT INTO chat_outbox (event_id, user_id, payload, instance_id)
SELECT event_id, $1, $7, $5 FROM call
RETURNING id
"""

_FINISH = """
WITH ready AS (
    UPDATE chat_outbox SET payload = $2, ready = true WHERE id = $1 AND event_id = $3 RETURNING event_id),
ended AS (
    UPDATE chat_calls SET ended_at = now(), outcome = $4
     WHERE event_id = (SELECT event_id FROM ready) AND ended_at IS NULL)
SELECT EXISTS (SELECT 1 FROM ready)
"""


def _outcome_json(outcome: Outcome) -> str:
    return json.dumps({"status": outcome.status, "body": outcome.body})


_FIND = """
SELECT c.request_hash, c.event_id, c.instance_id, c.stream, c.outcome,
       EXISTS (SELECT 1 FROM chat_instances i WHERE i.instance_id = c.instance_id AND i.alive_until > now()) AS alive
  FROM chat_calls c WHERE c.user_id = $1 AND c.idempotency_key = $2
"""


class PgCallStore(CallStore):
    def __init__(self, pool: asyncpg.Pool, on_ready: Any = lambda: None):
        self.pool, self.on_ready = pool, on_ready

    async def claim(
        self, user_id: str, key: str, request_hash: str, instance_id: UUID, stream: bool, pending: ModelCallCompleted
    ) -> int | None:
        handle: int | None = await self.pool.fetchval(
            _CLAIM, user_id, key, request_hash, pending.event_id, instance_id, stream, pending.to_json()
        )
        return handle

    async def find(self, user_id: str, key: str) -> CallRecord | None:
        row = await self.pool.fetchrow(_FIND, user_id, key)
        if row is None:
            return None
        outcome = None
        if row["outcome"] is not None:
            stored = json.loads(row["outcome"])
            outcome = Outcome(stored["status"], stored["body"])
        return CallRecord(
            user_id, key, row["request_hash"], row["event_id"], row["instance_id"], row["stream"], outcome, row["alive"]
        )

    async def finish(self, handle: int, event: ModelCallCompleted, outcome: Outcome) -> bool:
        # One statement, so one round trip and its own transaction: the call ends only if its outbox row
        # took the event (one BEGIN, UPDATE, UPDATE, COMMIT before: issue 22).
        done = await self.pool.fetchval(_FINISH, handle, event.to_json(), event.event_id, _outcome_json(outcome))
        if not done:
            return False
        self.on_ready()
        return True

    async def end(self, event_id: UUID, outcome: Outcome) -> Outcome:
        # Both parts read one snapshot: the row the UPDATE ends had no outcome before it.
        stored = await self.pool.fetchval(
            """WITH ended AS (
                   UPDATE chat_calls SET ended_at = now(), outcome = $2
                    WHERE event_id = $1 AND ended_at IS NULL RETURNING outcome)
               SELECT coalesce((SELECT outcome FROM ended), (SELECT outcome FROM chat_calls WHERE event_id = $1))""",
            event_id,
            _outcome_json(outcome),
        )
        if stored is None:  # no such call (purged)
            return outcome
        kept = json.loads(stored)
        return Outcome(kept["status"], kept["body"])

    async def forget(self, handle: int, user_id: str, key: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM chat_outbox WHERE id = $1 AND NOT ready", handle)
            await conn.execute(
                "DELETE FROM chat_calls WHERE user_id = $1 AND idempotency_key = $2 AND ended_at IS NULL", user_id, key
            )

    async def renew_lease(self, instance_id: UUID, lease_s: float) -> None:
        await self.pool.execute(
            """INSERT INTO chat_instances (instance_id, alive_until) VALUES ($1, now() + make_interval(secs => $2))
               ON CONFLICT (instance_id) DO UPDATE SET alive_until = EXCLUDED.alive_until""",
            instance_id,
            lease_s,
        )

    async def end_lease(self, instance_id: UUID) -> None:
        await self.pool.execute("UPDATE chat_instances SET alive_until = now() WHERE instance_id = $1", instance_id)

    async def purge(self, answer_kept_s: float, call_kept_s: float) -> tuple[int, int]:
        async with self.pool.acquire() as conn:
            answers = await conn.execute(
                """UPDATE chat_calls
                      SET answer_kept = false,
                          outcome = jsonb_set(jsonb_set(outcome, '{body,reply}', 'null'::jsonb, false),
                                              '{body,answer_dropped}', 'true'::jsonb, true)
                    WHERE answer_kept AND ended_at < now() - make_interval(secs => $1)""",
                answer_kept_s,
            )
            calls = await conn.execute(
                "DELETE FROM chat_calls WHERE created_at < now() - make_interval(secs => $1) AND ended_at IS NOT NULL",
                call_kept_s,
            )
            await conn.execute("DELETE FROM chat_instances WHERE alive_until < now() - interval '1 day'")
        return int(answers.split()[-1]), int(calls.split()[-1])
