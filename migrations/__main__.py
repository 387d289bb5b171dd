"""`python -m migrations` applies pending migrations to DATABASE_URL."""

import asyncio
import os

import asyncpg

from migrations import apply_migrations

DEFAULT_URL = "postgresql://byok:byok@127.0.0.1:55432/byok"


async def main() -> None:
    conn = await asyncpg.connect(os.environ.get("DATABASE_URL", DEFAULT_URL))
    try:
        applied = await apply_migrations(conn)
    finally:
        await conn.close()
    print("applied: " + ", ".join(applied) if applied else "database is up to date")


if __name__ == "__main__":
    asyncio.run(main())
