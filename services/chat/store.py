"""Each user's model settings in PostgreSQL: provider, model, whether to use their own key, and that
key's hint and last known status. Never the key itself (the table's CHECK keeps the hint hint-sized)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import asyncpg

from schemas.events import Provider


@dataclass(frozen=True)
class ModelSettings:
    user_id: str
    provider: Provider
    model: str
    use_own_key: bool = False
    key_hint: str | None = None
    key_status: str | None = None
    key_message: str | None = None

    def without_key(self) -> ModelSettings:
        return replace(self, use_own_key=False, key_hint=None, key_status=None, key_message=None)


class SettingsStore:
    """Port: where model settings live (PostgreSQL here, a dict in unit tests)."""

    async def get(self, user_id: str) -> ModelSettings | None: ...

    async def put(self, settings: ModelSettings) -> None: ...

    async def mark_key(self, user_id: str, hint: str | None, status: str, message: str) -> None:
        """Record what a call just learnt about the user's key (e.g. revoked), if it is still that key."""


class PgSettingsStore(SettingsStore):
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def get(self, user_id: str) -> ModelSettings | None:
        row = await self.pool.fetchrow(
            "SELECT provider, model, use_own_key, key_hint, key_status, key_message"
            " FROM chat_model_settings WHERE user_id = $1",
            user_id,
        )
        if row is None:
            return None
        return ModelSettings(user_id, Provider(row["provider"]), row["model"], row["use_own_key"],
                             row["key_hint"], row["key_status"], row["key_message"])

    async def put(self, s: ModelSettings) -> None:
        await self.pool.execute(
            """INSERT INTO chat_model_settings (user_id, provider, model, use_own_key, key_hint, key_status, key_message)
               VALUES ($1, $2, $3, $4, $5, $6, $7)
               ON CONFLICT (user_id) DO UPDATE SET provider = $2, model = $3, use_own_key = $4,
                   key_hint = $5, key_status = $6, key_message = $7, updated_at = now()""",
            s.user_id, s.provider.value, s.model, s.use_own_key, s.key_hint, s.key_status, s.key_message,
        )

    async def mark_key(self, user_id: str, hint: str | None, status: str, message: str) -> None:
        await self.pool.execute(
            """UPDATE chat_model_settings SET key_status = $3, key_message = $4, updated_at = now()
               WHERE user_id = $1 AND use_own_key AND key_hint IS NOT DISTINCT FROM $2""",
            user_id, hint, status, message,
        )


class MemorySettingsStore(SettingsStore):
    """For unit tests and the benchmark's in-process wiring."""

    def __init__(self):
        self.rows: dict[str, ModelSettings] = {}

    async def get(self, user_id: str) -> ModelSettings | None:
        return self.rows.get(user_id)

    async def put(self, settings: ModelSettings) -> None:
        self.rows[settings.user_id] = settings

    async def mark_key(self, user_id: str, hint: str | None, status: str, message: str) -> None:
        s = self.rows.get(user_id)
        if s and s.use_own_key and s.key_hint == hint:
            self.rows[user_id] = replace(s, key_status=status, key_message=message)
