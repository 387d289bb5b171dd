"""The ledger's invariants hold in the database itself: these tests bypass Python and expect refusals."""

import uuid

import asyncpg
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
async def conn(database_url, db_schema):
    c = await asyncpg.connect(database_url, server_settings={"search_path": db_schema})
    await c.execute("INSERT INTO accounts (user_id) VALUES ('alice')")
    await c.execute("INSERT INTO grants (grant_key, user_id, plan, credits) VALUES ('g1', 'alice', 'free', 50)")
    yield c
    await c.close()


async def debit(conn, credits, event_id=None):
    event_id = event_id or uuid.uuid4()
    await conn.execute(
        """INSERT INTO ledger_entries (entry_id, event_id, kind, user_id, decision, credits, price_list_version)
           VALUES ($1, $1, 'decision', 'alice', 'debited', $2, 'v')""",
        event_id,
        credits,
    )
    return event_id


async def balance(conn):
    return await conn.fetchrow("SELECT granted, debited, balance FROM accounts WHERE user_id='alice'")


async def test_balance_is_grants_minus_debits_and_may_go_below_zero(conn):
    await debit(conn, 5)
    await debit(conn, 50)
    assert tuple(await balance(conn)) == (50, 55, -5)


async def test_an_entry_for_a_user_without_an_account_is_refused_with_its_whole_statement(conn):
    rows = [(uuid.uuid4(), "alice"), (uuid.uuid4(), "nobody")]
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="nobody"):
        await conn.copy_records_to_table(
            "ledger_entries",
            columns=["entry_id", "event_id", "kind", "user_id", "decision", "credits", "price_list_version"],
            records=[(i, i, "decision", u, "debited", 3, "v") for i, u in rows],
        )
    assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == 0  # alice's row went too
    assert tuple(await balance(conn)) == (50, 0, 50)
    with pytest.raises(asyncpg.ForeignKeyViolationError):  # one row at a time, and for a zero debit
        await conn.execute(
            """INSERT INTO ledger_entries (entry_id, event_id, kind, user_id, decision, credits)
               VALUES ($1, $1, 'decision', 'nobody', 'not_billed_byok', 0)""",
            uuid.uuid4(),
        )


async def test_a_second_decision_for_one_event_is_refused(conn):
    event_id = await debit(conn, 5)
    with pytest.raises(asyncpg.UniqueViolationError):
        await debit(conn, 5, event_id)
    assert tuple(await balance(conn)) == (50, 5, 45)


async def test_sums_and_balance_cannot_be_set_directly(conn):
    with pytest.raises(asyncpg.CheckViolationError, match="cannot be set directly"):
        await conn.execute("UPDATE accounts SET granted = 1000 WHERE user_id = 'alice'")
    with pytest.raises(asyncpg.GeneratedAlwaysError):
        await conn.execute("UPDATE accounts SET balance = 1000 WHERE user_id = 'alice'")
    with pytest.raises(asyncpg.CheckViolationError, match="starts at zero"):
        await conn.execute("INSERT INTO accounts (user_id, granted) VALUES ('bob', 1000)")


async def test_history_is_append_only(conn):
    event_id = await debit(conn, 5)
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await conn.execute("UPDATE ledger_entries SET credits = 1 WHERE event_id = $1", event_id)
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await conn.execute("DELETE FROM ledger_entries")
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await conn.execute("DELETE FROM grants")


async def test_a_decision_debits_only_positive_amounts_and_records_the_price_list(conn):
    with pytest.raises(asyncpg.CheckViolationError):
        await debit(conn, -3)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            """INSERT INTO ledger_entries (entry_id, event_id, kind, user_id, decision, credits)
               VALUES ($1, $1, 'decision', 'alice', 'debited', 5)""",
            uuid.uuid4(),
        )
    with pytest.raises(asyncpg.CheckViolationError):  # a BYOK decision carrying credits
        await conn.execute(
            """INSERT INTO ledger_entries (entry_id, event_id, kind, user_id, decision, credits, price_list_version)
               VALUES ($1, $1, 'decision', 'alice', 'not_billed_byok', 5, 'v')""",
            uuid.uuid4(),
        )


async def test_a_correction_may_refund(conn):
    await debit(conn, 5)
    await conn.execute(
        """INSERT INTO ledger_entries (entry_id, event_id, kind, user_id, decision, credits, reason)
           VALUES ($1, NULL, 'correction', 'alice', 'correction', -5, 'refund')""",
        uuid.uuid4(),
    )
    assert tuple(await balance(conn)) == (50, 0, 50)
