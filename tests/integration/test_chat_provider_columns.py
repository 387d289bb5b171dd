"""Migration 0016: the chat's tables do not restate the provider list (issue 23). A fifth provider's rows
fit without a migration; the database still refuses a value no provider enum could have. These tests
bypass Python (the edge's `Provider` enum) and write SQL directly."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from services.shared.db import create_pool

pytestmark = pytest.mark.integration

SETTINGS = "INSERT INTO chat_model_settings (user_id, provider, model) VALUES ($1, $2, 'some-model')"
KEYS = """INSERT INTO chat_session_keys (key_id, user_id, session_id, provider, key_hint, key_status, expires_at)
          VALUES ($1, $2, 's1', $3, 'k…a1b2', 'valid', now() + interval '1 hour')"""


@pytest.fixture
async def pool(database_url: str, db_schema: str):
    pool = await create_pool(database_url, db_schema, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def test_a_fifth_providers_rows_need_no_migration(pool: asyncpg.Pool):
    await pool.execute(SETTINGS, "ann", "mistral")
    await pool.execute(KEYS, uuid.uuid4(), "ann", "mistral")
    assert await pool.fetchval("SELECT provider FROM chat_model_settings WHERE user_id = 'ann'") == "mistral"
    assert await pool.fetchval("SELECT count(*) FROM chat_session_keys WHERE provider = 'mistral'") == 1


@pytest.mark.parametrize("value", ["", "OpenAI", "open ai", "openai'; --", "x" * 41, "9lives"])
async def test_a_value_no_provider_could_have_is_refused(pool: asyncpg.Pool, value: str):
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(SETTINGS, f"u-{uuid.uuid4().hex[:8]}", value)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(KEYS, uuid.uuid4(), "bob", value)
