"""Each user's model settings and the server's record of their session keys, in PostgreSQL.

Settings: provider, model, whether to use their own key, whether to fall back to platform credits
when there is no usable key. Key records: id, provider, hint and last known status of each key a
session holds, so the server can revoke a key cookie. Never the key itself (CHECKs keep hints
hint-sized, so a bug cannot park a whole key there).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from schemas.events import Provider

# Why a key record stops being live (the table's CHECK lists the same words).
REVOKED_SIGN_OUT, REVOKED_BYOK_OFF, REVOKED_REMOVED, REVOKED_REPLACED = "sign_out", "byok_off", "removed", "replaced"


@dataclass(frozen=True)
class ModelSettings:
    user_id: str
    provider: Provider
    model: str
    use_own_key: bool = False
    # Off by default: with BYOK on and no usable key, chat is refused rather than billed.
    fallback_to_platform: bool = False


@dataclass(frozen=True)
class KeyRecord:
    """What the server knows of one session key (the key itself stays in the cookie)."""

    key_id: UUID
    provider: Provider
    hint: str
    status: str
    message: str | None
    expires_at: datetime


class SettingsStore:
    """Port: where model settings and key records live (PostgreSQL here, dicts in unit tests)."""

    async def get(self, user_id: str) -> ModelSettings | None: ...

    async def put(self, settings: ModelSettings) -> None: ...

    async def load(
        self, user_id: str, session_id: str, key_ids: Sequence[UUID]
    ) -> tuple[ModelSettings | None, dict[Provider, KeyRecord]]:
        """The user's settings and the live records (not revoked, not expired) among `key_ids` of
        this user's session, in one round trip."""
        raise NotImplementedError

    async def add_key(self, user_id: str, session_id: str, record: KeyRecord) -> None:
        """Record a checked key, revoking (as replaced) the session's live key of the same provider."""
        raise NotImplementedError

    async def mark_key(self, key_id: UUID, status: str, message: str | None) -> None:
        """Record what a call just learnt about a key (e.g. revoked at the provider)."""
        raise NotImplementedError

    async def revoke_keys(
        self, user_id: str, reason: str, *, session_id: str | None = None, provider: Provider | None = None
    ) -> int:
        """Revoke the user's live keys (of one session and/or one provider when given); how many."""
        raise NotImplementedError

    async def purge_keys(self, expired_before: datetime) -> int:
        """Delete the key records whose key expired before `expired_before` (revoked or not); how many."""
        raise NotImplementedError


_LOAD = """
SELECT s.provider, s.model, s.use_own_key, s.fallback_to_platform,
       (SELECT coalesce(json_agg(json_build_array(k.key_id, k.provider, k.key_hint, k.key_status, k.key_message,
                                                  k.expires_at)), '[]')
          FROM chat_session_keys k
         WHERE k.key_id = ANY($3::uuid[]) AND k.user_id = $1 AND k.session_id = $2
           AND k.revoked_at IS NULL AND k.expires_at > now()) AS keys
  FROM (SELECT $1::text AS user_id) u LEFT JOIN chat_model_settings s ON s.user_id = u.user_id
"""


class PgSettingsStore(SettingsStore):
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def get(self, user_id: str) -> ModelSettings | None:
        settings, _ = await self.load(user_id, "-", [])
        return settings

    async def load(
        self, user_id: str, session_id: str, key_ids: Sequence[UUID]
    ) -> tuple[ModelSettings | None, dict[Provider, KeyRecord]]:
        row = await self.pool.fetchrow(_LOAD, user_id, session_id, list(key_ids))
        settings = (
            None
            if row["provider"] is None
            else ModelSettings(
                user_id, Provider(row["provider"]), row["model"], row["use_own_key"], row["fallback_to_platform"]
            )
        )
        keys = {}
        for key_id, provider, hint, status, message, expires in json.loads(row["keys"]):
            record = KeyRecord(UUID(key_id), Provider(provider), hint, status, message, datetime.fromisoformat(expires))
            keys[record.provider] = record
        return settings, keys

    async def put(self, s: ModelSettings) -> None:
        await self.pool.execute(
            """INSERT INTO chat_model_settings (user_id, provider, model, use_own_key, fallback_to_platform)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (user_id) DO UPDATE SET provider = $2, model = $3, use_own_key = $4,
                   fallback_to_platform = $5, updated_at = now()""",
            s.user_id,
            s.provider.value,
            s.model,
            s.use_own_key,
            s.fallback_to_platform,
        )

    async def add_key(self, user_id: str, session_id: str, r: KeyRecord) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """UPDATE chat_session_keys SET revoked_at = now(), revoked_reason = 'replaced'
                   WHERE user_id = $1 AND session_id = $2 AND provider = $3 AND revoked_at IS NULL""",
                user_id,
                session_id,
                r.provider.value,
            )
            await conn.execute(
                """INSERT INTO chat_session_keys (key_id, user_id, session_id, provider, key_hint, key_status,
                                                  key_message, expires_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                r.key_id,
                user_id,
                session_id,
                r.provider.value,
                r.hint,
                r.status,
                r.message,
                r.expires_at,
            )

    async def mark_key(self, key_id: UUID, status: str, message: str | None) -> None:
        await self.pool.execute(
            """UPDATE chat_session_keys SET key_status = $2, key_message = $3, checked_at = now()
               WHERE key_id = $1 AND revoked_at IS NULL""",
            key_id,
            status,
            message,
        )

    async def revoke_keys(
        self, user_id: str, reason: str, *, session_id: str | None = None, provider: Provider | None = None
    ) -> int:
        done = await self.pool.execute(
            """UPDATE chat_session_keys SET revoked_at = now(), revoked_reason = $2
               WHERE user_id = $1 AND revoked_at IS NULL
                 AND ($3::text IS NULL OR session_id = $3) AND ($4::text IS NULL OR provider = $4)""",
            user_id,
            reason,
            session_id,
            provider.value if provider else None,
        )
        return int(done.split()[-1])

    async def purge_keys(self, expired_before: datetime) -> int:
        done = await self.pool.execute("DELETE FROM chat_session_keys WHERE expires_at < $1", expired_before)
        return int(done.split()[-1])
