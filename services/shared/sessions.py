"""Sessions that end on the server: which signed tokens are no longer honoured although unexpired.

A sign-out revokes its session id; "sign out everywhere" refuses every token of the user issued before
that moment. Both are rows in PostgreSQL (migration 0017), so every instance of every service sees
them. Each process keeps them in memory and reads what is new every `refresh_s` (a handful of rows, by
an index on the time they were written), so checking a request costs a set lookup, not a round trip;
a revocation made by this process counts at once, one made elsewhere within `refresh_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import datetime, timedelta, timezone

import asyncpg

from services.shared.auth import Identity

log = logging.getLogger(__name__)
# Rows written within this margin before the last one seen are read again (clocks of writers differ).
_OVERLAP = timedelta(seconds=5)


def _cutoff(not_before: datetime) -> float:
    """Tokens issued (`iat`, whole seconds) before this are refused: a token of the very second of the
    sign-out may be older than it, so it is refused too."""
    return float(math.floor(not_before.timestamp()) + 1)


class SessionRevocations:
    def __init__(self, pool: asyncpg.Pool, *, refresh_s: float = 1.0, token_max_ttl_s: float = 86_400.0):
        self.pool, self.refresh_s, self.token_max_ttl_s = pool, refresh_s, token_max_ttl_s
        self._sessions: set[str] = set()
        self._not_before: dict[str, float] = {}
        self._seen = datetime.fromtimestamp(0, tz=timezone.utc)
        self._task: asyncio.Task[None] | None = None

    def is_revoked(self, who: Identity) -> bool:
        if who.session_id in self._sessions:
            return True
        cutoff = self._not_before.get(who.user_id)
        return cutoff is not None and who.issued_at < cutoff

    async def revoke(self, who: Identity) -> None:
        """End this sign-in: its tokens (and any renewal of them) are refused from now on."""
        forget = datetime.now(timezone.utc) + timedelta(seconds=self.token_max_ttl_s)
        await self.pool.execute(
            """INSERT INTO auth_revoked_sessions (session_id, user_id, forget_after) VALUES ($1, $2, $3)
               ON CONFLICT (session_id) DO NOTHING""",
            who.session_id,
            who.user_id,
            forget,
        )
        self._sessions.add(who.session_id)

    async def revoke_everywhere(self, user_id: str) -> None:
        """End every sign-in of the user: tokens issued before now are refused."""
        now = await self.pool.fetchval(
            """INSERT INTO auth_signed_out_everywhere (user_id, not_before) VALUES ($1, now())
               ON CONFLICT (user_id) DO UPDATE SET not_before = now(), updated_at = now()
               RETURNING not_before""",
            user_id,
        )
        self._not_before[user_id] = _cutoff(now)

    async def refresh(self) -> None:
        """Read the revocations written since the last read (all, the first time)."""
        since = self._seen - _OVERLAP
        async with self.pool.acquire() as conn:
            sessions = await conn.fetch(
                "SELECT session_id, revoked_at FROM auth_revoked_sessions WHERE revoked_at > $1 AND forget_after > now()",
                since,
            )
            everywhere = await conn.fetch(
                "SELECT user_id, not_before, updated_at FROM auth_signed_out_everywhere WHERE updated_at > $1", since
            )
        for row in sessions:
            self._sessions.add(row["session_id"])
            self._seen = max(self._seen, row["revoked_at"])
        for row in everywhere:
            cutoff = _cutoff(row["not_before"])
            self._not_before[row["user_id"]] = max(self._not_before.get(row["user_id"], 0.0), cutoff)
            self._seen = max(self._seen, row["updated_at"])

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._keep_fresh(), name="session-revocations")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def purge(self) -> int:
        """Delete revocations whose tokens have all expired."""
        done = await self.pool.execute("DELETE FROM auth_revoked_sessions WHERE forget_after < now()")
        return int(done.split()[-1])

    async def _keep_fresh(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
                if failing:
                    log.info("session revocations are read again")
                failing = False
            except Exception as exc:  # the database is away: what is known stays in force
                if not failing:
                    log.warning("cannot read session revocations (%s); using what is known", type(exc).__name__)
                failing = True
