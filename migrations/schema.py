"""`migrations/schema.sql`: the schema the migrations build, in one file a reader can take in at once.

    python -m migrations.schema            # rewrite schema.sql (make schema)
    python -m migrations.schema --check    # exit 1 if schema.sql differs from what the migrations build

Both apply every migration to a fresh, uniquely named schema of DATABASE_URL, take `pg_dump
--schema-only` of it, and drop it again. The dump is normalized so it reads like hand-written DDL and
does not depend on the schema's name: no schema prefixes, no SET lines or `--` comments, no CREATE
SCHEMA, single blank lines. The migrations stay the truth; this file is their current result, and
tests/integration/test_migrations.py fails when the two drift apart.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg

from migrations import CURRENT_SCHEMA, MIGRATIONS_DIR, apply_migrations

SCHEMA_FILE = MIGRATIONS_DIR / CURRENT_SCHEMA
DEFAULT_URL = "postgresql://byok:byok@127.0.0.1:55432/byok"
HEADER = (
    "-- The current schema, as the migrations in this folder build it (generated: `make schema`).\n"
    "-- Do not edit: add a migration, then regenerate. A test fails when this file drifts.\n"
)


def pg_dump_binary() -> str:
    """`PG_DUMP`, else the newest PostgreSQL's pg_dump under /usr/lib/postgresql, else pg_dump on PATH."""
    if os.environ.get("PG_DUMP"):
        return os.environ["PG_DUMP"]
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return found[-1]
    on_path = shutil.which("pg_dump")
    if on_path is None:
        raise FileNotFoundError("pg_dump not found: install PostgreSQL's client tools or set PG_DUMP")
    return on_path


def normalize(dump: str, schema: str) -> str:
    """pg_dump's output without what depends on the schema's name or on the dump's session."""
    kept: list[str] = []
    for line in dump.splitlines():
        if line.startswith(("SET ", "SELECT pg_catalog.set_config(", "--", "\\restrict", "\\unrestrict")):
            continue
        if line.startswith("CREATE SCHEMA "):
            continue
        kept.append(line.replace(f'"{schema}".', "").replace(f"{schema}.", "").rstrip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    return HEADER + "\n" + text + "\n"


async def current_schema(url: str, directory: Path = MIGRATIONS_DIR) -> str:
    """The normalized schema that every migration in `directory`, applied to an empty schema, builds."""
    schema = f"schema_dump_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        await apply_migrations(conn, directory)
        dump = await asyncio.to_thread(
            subprocess.run,
            [pg_dump_binary(), "--schema-only", "--no-owner", "--no-privileges", f"--schema={schema}", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return normalize(dump.stdout, schema)
    finally:
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def main(argv: list[str]) -> int:
    url = os.environ.get("DATABASE_URL", DEFAULT_URL)
    built = await current_schema(url)
    if "--check" in argv:
        if SCHEMA_FILE.exists() and SCHEMA_FILE.read_text() == built:
            print(f"{SCHEMA_FILE.name} matches the migrations")
            return 0
        print(f"{SCHEMA_FILE.name} differs from what the migrations build: run `make schema`", file=sys.stderr)
        return 1
    SCHEMA_FILE.write_text(built)
    print(f"wrote {SCHEMA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
