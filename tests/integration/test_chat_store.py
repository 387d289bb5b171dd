"""The chat service's PostgreSQL store of settings and key records, on the real database."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from schemas.events import Provider
from services.chat.store import KeyRecord, ModelSettings, PgSettingsStore
from services.shared.db import create_pool

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(database_url: str, db_schema: str):
    pool = await create_pool(database_url, db_schema, max_size=2)
    try:
        yield PgSettingsStore(pool)
    finally:
        await pool.close()


def record(provider=Provider.OPENAI, hint="sk-…a1b2", status="valid", hours=8) -> KeyRecord:
    return KeyRecord(uuid.uuid4(), provider, hint, status, "works", datetime.now(timezone.utc) + timedelta(hours=hours))


async def test_settings_and_live_keys_load_in_one_read_and_revocation_ends_them(store: PgSettingsStore):
    assert await store.load("ann", "s1", []) == (None, {})
    await store.put(ModelSettings("ann", Provider.GROQ, "llama3-8b-8192", True, fallback_to_platform=True))
    openai, groq, expired = record(), record(Provider.GROQ, "gsk_…b2c3"), record(Provider.GEMINI, hours=-1)
    for r in (openai, groq, expired):
        await store.add_key("ann", "s1", r)
    settings, keys = await store.load("ann", "s1", [openai.key_id, groq.key_id, expired.key_id])
    assert settings == ModelSettings("ann", Provider.GROQ, "llama3-8b-8192", True, True)
    assert keys == {Provider.OPENAI: openai, Provider.GROQ: groq}  # the expired one is not live
    assert (await store.load("ann", "s2", [openai.key_id]))[1] == {}  # another session's key
    assert (await store.load("bob", "s1", [openai.key_id]))[1] == {}  # another user's key

    await store.mark_key(groq.key_id, "revoked_or_expired", "revoked at the provider")
    assert (await store.load("ann", "s1", [groq.key_id]))[1][Provider.GROQ].status == "revoked_or_expired"

    newer = record(hint="sk-…9999")
    await store.add_key("ann", "s1", newer)  # replaces the session's OpenAI key
    assert (await store.load("ann", "s1", [openai.key_id, newer.key_id]))[1] == {Provider.OPENAI: newer}
    assert await store.revoke_keys("ann", "removed", session_id="s1", provider=Provider.GROQ) == 1
    assert await store.revoke_keys("ann", "sign_out", session_id="s1") == 2  # the new OpenAI and the expired key
    assert (await store.load("ann", "s1", [openai.key_id, groq.key_id, newer.key_id]))[1] == {}


async def test_the_database_refuses_two_live_keys_of_one_provider_in_a_session_and_whole_keys(store: PgSettingsStore):
    first = record()
    await store.add_key("cy", "s1", first)
    insert = """INSERT INTO chat_session_keys (key_id, user_id, session_id, provider, key_hint, key_status, expires_at)
                VALUES ($1, 'cy', 's1', 'openai', $2, 'valid', now() + interval '1 hour')"""
    with pytest.raises(asyncpg.UniqueViolationError):  # bypassing add_key, which revokes the old one first
        await store.pool.execute(insert, uuid.uuid4(), "sk-…0000")
    with pytest.raises(asyncpg.CheckViolationError):  # a hint-sized column cannot hold a whole key
        await store.pool.execute(insert.replace("'s1'", "'s2'"), uuid.uuid4(), "sk-proj-" + "k" * 40)
    with pytest.raises(asyncpg.CheckViolationError):  # revoked needs a reason from the list
        await store.pool.execute("UPDATE chat_session_keys SET revoked_at = now(), revoked_reason = 'whim'")


async def test_key_records_are_purged_a_retention_period_after_their_key_expired(store: PgSettingsStore):
    now = datetime.now(timezone.utc)
    live, just_expired, long_expired = record(), record(Provider.GROQ, hours=-1), record(Provider.GEMINI, hours=-30)
    revoked_long_ago = record(Provider.ANTHROPIC, hours=-48)
    for r in (live, just_expired, long_expired, revoked_long_ago):
        await store.add_key("dee", "s1", r)
    await store.revoke_keys("dee", "removed", provider=Provider.ANTHROPIC)
    assert await store.purge_keys(now - timedelta(days=1)) == 2  # expired over a day ago, revoked or not
    left = {r["key_id"] for r in await store.pool.fetch("SELECT key_id FROM chat_session_keys WHERE user_id = 'dee'")}
    assert left == {live.key_id, just_expired.key_id}
    assert await store.purge_keys(now - timedelta(days=1)) == 0
