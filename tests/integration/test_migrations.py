import difflib

import asyncpg
import pytest

from migrations import apply_migrations, discover
from migrations.schema import SCHEMA_FILE, current_schema
from services.shared.db import migrate

pytestmark = pytest.mark.integration


async def test_all_migrations_apply_to_an_empty_schema_and_a_second_run_applies_nothing(database_url, db_schema):
    # db_schema already ran them once; running again must be a no-op.
    assert await migrate(database_url, db_schema) == []
    conn = await asyncpg.connect(database_url, server_settings={"search_path": db_schema})
    try:
        recorded = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")]
        assert recorded == [m.name for m in discover()]
        assert await apply_migrations(conn) == []
    finally:
        await conn.close()


async def test_an_edited_applied_migration_is_reported(database_url, db_schema, tmp_path):
    for m in discover():
        (tmp_path / m.name).write_text(m.sql + "\n-- edited\n")
    conn = await asyncpg.connect(database_url, server_settings={"search_path": db_schema})
    try:
        with pytest.raises(Exception, match="changed after it was applied"):
            await apply_migrations(conn, tmp_path)
    finally:
        await conn.close()


async def test_schema_sql_is_what_the_migrations_build(database_url):
    built = await current_schema(database_url)
    drift = "".join(
        difflib.unified_diff(
            SCHEMA_FILE.read_text().splitlines(True),
            built.splitlines(True),
            "migrations/schema.sql",
            "built by the migrations",
        )
    )
    assert not drift, f"migrations/schema.sql drifted from the migrations; run `make schema`:\n{drift}"


async def test_a_new_migration_shows_in_the_built_schema(database_url, tmp_path):
    # The drift check above can fail: one more migration changes what is built.
    for m in discover():
        (tmp_path / m.name).write_text(m.sql)
    (tmp_path / "9999_probe.sql").write_text("CREATE TABLE drift_probe (id int PRIMARY KEY);")
    built = await current_schema(database_url, tmp_path)
    assert "CREATE TABLE drift_probe" in built and built != SCHEMA_FILE.read_text()
    assert "schema_dump_" not in built  # no trace of the scratch schema's name
