"""PostgreSQL connections for the services."""

from __future__ import annotations

import asyncpg

from migrations import apply_migrations


def server_settings(schema: str | None) -> dict[str, str]:
    settings = {"application_name": "byok-credits"}
    if schema:
        settings["search_path"] = schema
    return settings


async def _keep_session(connection: asyncpg.Connection) -> None:
    """A pool `reset` that sends nothing (asyncpg still rolls back a transaction left open)."""


async def create_pool(
    url: str, schema: str | None = None, *, min_size: int = 1, max_size: int = 10, reset_sessions: bool = True
) -> asyncpg.Pool:
    """A connection pool on `schema`.

    `reset_sessions=False` skips the reset query asyncpg otherwise sends each time a connection goes
    back to the pool (`RESET ALL`, `UNLISTEN *`, ...: a second round trip for every one-statement
    query), for code that never changes session state: no SET, LISTEN, advisory lock or cursor.
    """
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        server_settings=server_settings(schema),
        reset=None if reset_sessions else _keep_session,
    )


async def migrate(url: str, schema: str | None = None) -> list[str]:
    """Apply pending migrations (into `schema` when given, creating it)."""
    conn = await asyncpg.connect(url, server_settings=server_settings(schema))
    try:
        if schema:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        return await apply_migrations(conn)
    finally:
        await conn.close()


# Errors that say the database cannot be reached or cannot take the transaction *now*, whatever it
# holds: retry them with back-off. Any other failure of a write is about its content, and retrying
# it would stall forever (a consumer then isolates the record; see services.credits.consumer).
_AWAY = (
    asyncpg.PostgresConnectionError,  # class 08: connection lost or refused (ConnectionDoesNotExistError, ...)
    asyncpg.exceptions.OperatorInterventionError,  # class 57: admin or crash shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
    # The client's protocol state broken by a connection that went away under it ("cannot switch to
    # state 12", a protocol error mid-message): asyncpg's own, about the connection, not the statement.
    asyncpg.exceptions.InternalClientError,
    OSError,  # refused, reset, unreachable, timed out (TimeoutError and ConnectionError are OSErrors)
)
_BUSY = (
    asyncpg.exceptions.TransactionRollbackError,  # class 40: serialization failure, deadlock
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a failover left us on a standby
)
# OSErrors that are about files, never about a connection: a bug or a deployment mistake.
_FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def database_away(exc: BaseException) -> bool:
    """True when `exc` says the connection to the database is gone or cannot be made: the server is
    down, restarting, out of connection slots or unreachable. False for what a statement or its
    arguments did wrong, and for misuse of the client (both bugs, which a retry cannot mend)."""
    if isinstance(exc, ValueError):  # asyncpg's DataError / ClientConfigurationError: the arguments, the settings
        return False
    if isinstance(exc, _FILE_ERRORS):
        return False
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed", "pool is closing", "connection was closed in the middle of operation";
        # not two coroutines sharing one connection, which is a bug of ours.
        return "another operation is in progress" not in str(exc)
    return isinstance(exc, _AWAY)


def database_unreachable(exc: BaseException) -> bool:
    """True when `exc` says the database is away or busy, not that a statement's content is wrong."""
    return database_away(exc) or isinstance(exc, _BUSY)
