"""Finance against the real broker and the real ledger: differences planted by direct SQL are each
reported exactly once, a clean ledger reports zero, repair fixes and is idempotent, the window's
edges are exact, and a replay rebuilds the balances."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from billing.policy import decide
from billing.pricing import default_price_book
from schemas.events import CallStatus, Feature, KeySource, ModelCallCompleted, Provider
from services.finance.differences import Kind
from services.finance.event_log import EventLogError
from services.finance.reconciliation import reconcile, repair
from services.finance.replay import ReplayRefused, replay
from services.finance.settings import FinanceSettings
from services.finance.window import Window, to_ms
from tests.support import make_event

pytestmark = pytest.mark.integration

# Two days ago, on the hour: old enough that T2 + lateness is in the past (the read then stops at a
# sought offset, not at the end of the topic), recent enough for any broker timestamp policy.
T1 = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
T2 = T1 + timedelta(hours=6)
WINDOW = Window(T1, T2)
US = timedelta(microseconds=1)
BOOK = default_price_book()


def event(**overrides) -> ModelCallCompleted:
    """A succeeded platform call by alice, an hour into the window."""
    return make_event(**({"occurred_at": T1 + timedelta(hours=1)} | overrides))


@dataclass
class Raw:
    """A record that is not an event, published with a chosen Kafka timestamp."""

    value: bytes
    at: datetime
    key: bytes = b"junk"


async def produce(stack, items: list, kafka_time: dict | None = None) -> None:
    """Publish events (Kafka timestamp = occurred_at unless `kafka_time[event_id]` says otherwise)."""
    kafka_time = kafka_time or {}
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        topic = stack.settings().model_call_completed_topic
        futures = []
        for item in items:
            if isinstance(item, Raw):
                futures.append(await producer.send(topic, item.value, key=item.key, timestamp_ms=to_ms(item.at)))
            else:
                at = kafka_time.get(item.event_id, item.occurred_at)
                futures.append(
                    await producer.send(topic, item.to_json(), key=item.user_id.encode(), timestamp_ms=to_ms(at))
                )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def ensure_account(conn, user_id: str, credits: int = 500) -> None:
    if await conn.fetchval("INSERT INTO accounts (user_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true", user_id):
        await conn.execute(
            "INSERT INTO grants (grant_key, user_id, plan, credits) VALUES ($1, $2, 'standard', $3)",
            f"g-{user_id}",
            user_id,
            credits,
        )


async def entry(
    conn,
    *,
    event_id,
    user_id="alice",
    kind="decision",
    decision="debited",
    credits=5,
    occurred_at=None,
    entry_id=None,
    e: ModelCallCompleted | None = None,
) -> None:
    """One ledger row by direct SQL, shaped like the credit service's."""
    await ensure_account(conn, user_id)
    await conn.execute(
        """INSERT INTO ledger_entries (entry_id, event_id, kind, user_id, decision, credits, price_list_version,
                                       provider, model, feature, key_source, status, occurred_at)
           VALUES ($1, $2, $3, $4, $5, $6, '2026-01', $7, $8, $9, $10, $11, $12)""",
        entry_id or event_id,
        event_id,
        kind,
        user_id,
        decision,
        credits,
        e and e.provider.value,
        e and e.model,
        e and e.feature.value,
        e and e.key_source.value,
        e and e.status.value,
        occurred_at or (e.occurred_at if e else T1 + timedelta(hours=1)),
    )


async def record_correctly(conn, events: list[ModelCallCompleted]) -> None:
    """What a correct credit service writes: one decision per event, by the credit policy."""
    for e in events:
        charge = decide(e, BOOK)
        await entry(
            conn, event_id=e.event_id, user_id=e.user_id, decision=charge.decision.value, credits=charge.credits, e=e
        )


def varied_events(n: int = 12, start: datetime = T1, **overrides) -> list[ModelCallCompleted]:
    shapes = [
        dict(),
        dict(key_source=KeySource.BYOK),
        dict(key_source=KeySource.BYOK, feature=Feature.DEEP_ANALYSIS),
        dict(feature=Feature.CODE_FIX, key_source=KeySource.BYOK),
        dict(status=CallStatus.FAILED),
        dict(model="claude-3-5-haiku", provider=Provider.ANTHROPIC),
        dict(model="o1"),
        dict(model="gpt-4o-mini", user_id="bob"),
        dict(model="not-a-priced-model"),
        dict(feature=Feature.CODE_CANVAS),
        dict(model="gemini-2.5-pro", provider=Provider.GEMINI, user_id="carol"),
        dict(key_source=KeySource.BYOK, status=CallStatus.FAILED, user_id="bob"),
    ]
    return [
        event(occurred_at=start + timedelta(minutes=7 * i), **(shapes[i % len(shapes)] | overrides)) for i in range(n)
    ]


@dataclass
class Planted:
    clean: list[ModelCallCompleted]
    by_kind: dict[Kind, list[uuid.UUID | None]] = field(default_factory=dict)


async def plant_every_kind(stack) -> Planted:
    """A window with correct events and one planted instance of every kind of difference."""
    conn = await stack.connect()
    try:
        clean = varied_events()
        await record_correctly(conn, clean)
        missing = event(user_id="dave")
        double = event(user_id="dave")
        await entry(conn, event_id=double.event_id, user_id="dave", e=double)
        # a second, debit-like entry for an event already debited (only decisions are unique per event: a
        # decision's entry_id is its event id, the primary key)
        await entry(
            conn,
            event_id=double.event_id,
            entry_id=uuid.uuid4(),
            user_id="dave",
            kind="correction",
            decision="correction",
            credits=5,
            e=double,
        )
        wrong = event(user_id="dave", model="gpt-4o-mini")  # owes 3
        await entry(conn, event_id=wrong.event_id, user_id="dave", credits=20, e=wrong)
        byok = event(user_id="erin", key_source=KeySource.BYOK)
        await entry(conn, event_id=byok.event_id, user_id="erin", e=byok)
        failed = event(user_id="erin", status=CallStatus.FAILED)
        await entry(conn, event_id=failed.event_id, user_id="erin", e=failed)
        ghost = uuid.uuid4()
        await entry(conn, event_id=ghost, user_id="erin", credits=3, occurred_at=T1 + timedelta(hours=2))
        # An unreadable record whose id can still be read, with a debit in the ledger: reported once,
        # as unreadable, not a second time as a debit with no event.
        broken_id = uuid.uuid4()
        await entry(conn, event_id=broken_id, user_id="erin", credits=5)
        raws = [
            Raw(b'{"event_id": "not closed', T1 + timedelta(hours=3)),
            Raw(
                json.dumps({"event_id": str(broken_id), "user_id": "erin", "provider": "nope"}).encode(),
                T1 + timedelta(hours=3),
            ),
        ]
    finally:
        await conn.close()
    await produce(stack, clean + [missing, double, wrong, byok, failed] + raws)
    return Planted(
        clean,
        {
            Kind.MISSING_DEBIT: [missing.event_id],
            Kind.DOUBLE_DEBIT: [double.event_id],
            Kind.WRONG_AMOUNT: [wrong.event_id],
            Kind.BYOK_CALL_DEBITED: [byok.event_id],
            Kind.FAILED_CALL_DEBITED: [failed.event_id],
            Kind.DEBIT_WITH_NO_EVENT: [ghost],
            Kind.UNREADABLE_EVENT: [None, broken_id],
        },
    )


def by_kind(report) -> dict[Kind, list]:
    out: dict[Kind, list] = {}
    for d in report.differences:
        out.setdefault(d.kind, []).append(d.event_id)
    return {k: sorted(v, key=str) for k, v in out.items()}


def settings_of(stack, **overrides) -> FinanceSettings:
    return stack.settings(FinanceSettings, **overrides)


async def ledger_rows(stack) -> list[tuple]:
    conn = await stack.connect()
    try:
        return [
            tuple(r)
            for r in await conn.fetch(
                "SELECT entry_id, event_id, kind, user_id, decision, credits FROM ledger_entries ORDER BY entry_id"
            )
        ]
    finally:
        await conn.close()


async def balances(stack) -> dict[str, int]:
    conn = await stack.connect()
    try:
        return dict(await conn.fetch("SELECT user_id, balance FROM accounts"))
    finally:
        await conn.close()


# --- reconcile ------------------------------------------------------------------------------------


async def test_a_correct_ledger_reconciles_to_zero(stack):
    events = varied_events(24)
    conn = await stack.connect()
    await record_correctly(conn, events)
    await conn.close()
    await produce(stack, events)

    report = await reconcile(settings_of(stack), WINDOW)

    assert report.differences == []
    assert report.clean
    assert report.tally.in_window == 24 and report.tally.unreadable == 0
    assert report.ledger_entries == 24


async def test_every_planted_difference_is_reported_exactly_once(stack):
    planted = await plant_every_kind(stack)

    report = await reconcile(settings_of(stack), WINDOW)

    expected = {k: sorted(v, key=str) for k, v in planted.by_kind.items()}
    assert by_kind(report) == expected
    assert len(report.differences) == 8
    details = {d.kind: d for d in report.differences if d.kind is not Kind.UNREADABLE_EVENT}
    assert (details[Kind.DOUBLE_DEBIT].expected_credits, details[Kind.DOUBLE_DEBIT].ledger_credits) == (5, 10)
    assert (details[Kind.WRONG_AMOUNT].expected_credits, details[Kind.WRONG_AMOUNT].ledger_credits) == (3, 20)
    assert details[Kind.MISSING_DEBIT].ledger_entries == 0
    assert details[Kind.DEBIT_WITH_NO_EVENT].ledger_credits == 3
    unreadable = {d.event_id: d for d in report.differences if d.kind is Kind.UNREADABLE_EVENT}
    assert unreadable[planted.by_kind[Kind.UNREADABLE_EVENT][1]].ledger_credits == 5
    assert report.tally.in_window == len(planted.clean) + 5


async def test_a_debit_on_the_wrong_account_shows_on_both_accounts(stack):
    e = event(user_id="alice")
    conn = await stack.connect()
    await ensure_account(conn, "alice")
    await entry(conn, event_id=e.event_id, user_id="bob", e=e)
    await conn.close()
    await produce(stack, [e])

    report = await reconcile(settings_of(stack), WINDOW)

    assert sorted((d.kind, d.user_id) for d in report.differences) == [
        (Kind.DEBIT_ON_WRONG_ACCOUNT, "bob"),
        (Kind.MISSING_DEBIT, "alice"),
    ]
    result = await repair(settings_of(stack), WINDOW, apply=True)
    assert result.written == 2
    assert (await reconcile(settings_of(stack), WINDOW)).clean


async def test_the_window_is_half_open_on_occurred_at(stack):
    # Every event here owes 5 and none is in the ledger, so each one read is a missing debit.
    at = {
        "before start": T1 - US,
        "at start": T1,
        "just before end": T2 - US,
        "at end": T2,
        "published late": T2 - timedelta(minutes=1),
    }
    events = {name: event(occurred_at=moment) for name, moment in at.items()}
    late = events["published late"]
    # Kafka timestamps beyond the window: still in, by occurred_at (within the lateness allowance).
    kafka_time = {late.event_id: T2 + timedelta(minutes=30)}
    conn = await stack.connect()
    # Ledger entries with no event, at both edges: the one at T2 is out of this window.
    ghost_in, ghost_out = uuid.uuid4(), uuid.uuid4()
    await entry(conn, event_id=ghost_in, occurred_at=T1)
    await entry(conn, event_id=ghost_out, occurred_at=T2)
    await conn.close()
    await produce(stack, list(events.values()) + [Raw(b"junk at start", T1), Raw(b"junk at end", T2)], kafka_time)

    report = await reconcile(settings_of(stack), WINDOW)

    missing = {d.event_id for d in report.differences if d.kind is Kind.MISSING_DEBIT}
    assert missing == {events[n].event_id for n in ("at start", "just before end", "published late")}
    assert [d.event_id for d in report.differences if d.kind is Kind.DEBIT_WITH_NO_EVENT] == [ghost_in]
    unreadable = [d.detail for d in report.differences if d.kind is Kind.UNREADABLE_EVENT]
    assert len(unreadable) == 1 and T1.isoformat() in unreadable[0]

    # The next window [T2, T2 + 1h) holds exactly what this one left out at its end.
    following = await reconcile(settings_of(stack), Window(T2, T2 + timedelta(hours=1)))
    assert {d.event_id for d in following.differences if d.kind is Kind.MISSING_DEBIT} == {events["at end"].event_id}
    assert [d.event_id for d in following.differences if d.kind is Kind.DEBIT_WITH_NO_EVENT] == [ghost_out]
    assert len([d for d in following.differences if d.kind is Kind.UNREADABLE_EVENT]) == 1


async def test_a_debit_whose_event_was_published_days_late_is_not_a_debit_with_no_event(stack):
    # Occurred in the window, published now: far beyond the one-hour lateness allowance. The credit
    # service debited it when it arrived; neither reconcile nor repair may call that debit baseless.
    e = event()
    conn = await stack.connect()
    await record_correctly(conn, [e])
    await conn.close()
    await produce(stack, [e], kafka_time={e.event_id: datetime.now(timezone.utc)})

    report = await reconcile(settings_of(stack), WINDOW)

    assert report.differences == [], by_kind(report)
    assert report.tally.in_window == 1
    assert (await repair(settings_of(stack), WINDOW, apply=True)).written == 0


async def test_redelivered_events_are_owed_once(stack):
    e = event()
    conn = await stack.connect()
    await record_correctly(conn, [e])
    await conn.close()
    await produce(stack, [e, e, e])

    report = await reconcile(settings_of(stack), WINDOW)

    assert report.clean and report.duplicate_deliveries == 2 and report.tally.in_window == 3


async def test_a_missing_topic_is_an_error_not_a_clean_report(stack):
    elsewhere = settings_of(stack).model_copy(update={"topic_prefix": "no-such-prefix."})
    with pytest.raises(EventLogError, match="does not exist"):
        await reconcile(elsewhere, WINDOW)


# --- repair ---------------------------------------------------------------------------------------


async def test_repair_is_a_dry_run_by_default_then_fixes_with_corrections_only_once(stack):
    planted = await plant_every_kind(stack)
    before = await ledger_rows(stack)

    dry = await repair(settings_of(stack), WINDOW)
    assert not dry.applied and dry.written == 0 and len(dry.corrections) == 6
    assert await ledger_rows(stack) == before
    by_event = {c.event_id: c.credits for c in dry.corrections}
    assert by_event[planted.by_kind[Kind.MISSING_DEBIT][0]] == 5
    assert by_event[planted.by_kind[Kind.DOUBLE_DEBIT][0]] == -5
    assert by_event[planted.by_kind[Kind.WRONG_AMOUNT][0]] == -17
    assert by_event[planted.by_kind[Kind.DEBIT_WITH_NO_EVENT][0]] == -3
    assert [d.kind for d in dry.not_repaired] == [Kind.UNREADABLE_EVENT] * 2

    applied = await repair(settings_of(stack), WINDOW, apply=True)
    assert applied.written == 6

    after = await ledger_rows(stack)
    assert set(before) <= set(after)  # history untouched: every earlier row is still there as it was
    added = set(after) - set(before)
    assert len(added) == 6 and {r[2] for r in added} == {"correction"}
    report = await reconcile(settings_of(stack), WINDOW)
    assert {d.kind for d in report.differences} == {Kind.UNREADABLE_EVENT}  # a person must look at those

    again = await repair(settings_of(stack), WINDOW, apply=True)
    assert again.written == 0 and again.corrections == []
    assert await ledger_rows(stack) == after


async def test_a_repair_run_twice_concurrently_on_the_same_state_writes_each_correction_once(stack):
    e = event()
    await produce(stack, [e])
    conn = await stack.connect()
    await ensure_account(conn, "alice")
    await conn.close()
    dry = await repair(settings_of(stack), WINDOW)  # computed before either run writes

    from services.finance import ledger

    conn = await stack.connect()
    try:
        assert await ledger.write_corrections(conn, dry.corrections) == 1
        assert await ledger.write_corrections(conn, dry.corrections) == 0
    finally:
        await conn.close()
    assert (await balances(stack))["alice"] == 495


# --- replay ---------------------------------------------------------------------------------------


@pytest.fixture
async def scratch(database_url):
    name = "finance_scratch_" + uuid.uuid4().hex[:8]
    yield name
    conn = await asyncpg.connect(database_url)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    await conn.close()


async def test_replay_rebuilds_every_balance_and_finds_a_wrong_one(stack, scratch):
    events = varied_events(20) + varied_events(5, start=T2 + timedelta(days=1))  # the whole log
    conn = await stack.connect()
    await record_correctly(conn, events)
    await conn.close()
    await produce(stack, events + events[:3])  # with redeliveries

    live_before = await balances(stack)
    result = await replay(settings_of(stack), scratch)
    assert result.clean and result.entries == 25 and result.accounts == 3
    # the scratch ledger's triggers must not touch the live accounts
    assert await balances(stack) == live_before

    conn = await stack.connect()
    await entry(conn, event_id=uuid.uuid4(), user_id="bob", credits=7)  # a debit no event explains
    rebuilt = await conn.fetchval(f'SELECT count(*) FROM "{scratch}".ledger_entries')
    await conn.close()
    assert rebuilt == 25

    with pytest.raises(ReplayRefused, match="--replace"):
        await replay(settings_of(stack), scratch)
    result = await replay(settings_of(stack), scratch, replace=True)
    assert [(d.user_id, d.delta) for d in result.differences] == [("bob", -7)]


async def test_replay_refuses_the_live_schema(stack):
    with pytest.raises(ReplayRefused):
        await replay(settings_of(stack), stack.database_schema)
    with pytest.raises(ReplayRefused):
        await replay(settings_of(stack), "public")


# --- the command line -------------------------------------------------------------------------------


async def run_cli(stack, *args: str, program=(sys.executable, "-m", "services.finance")) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *program,
        *args,
        env={**os.environ, **stack.env(), "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode, out.decode()


async def test_the_cli_reports_repairs_and_replays_with_exit_codes(stack, tmp_path, scratch):
    events = varied_events(6)
    missing = event(user_id="bob")
    conn = await stack.connect()
    await record_correctly(conn, events)
    await conn.close()
    await produce(stack, events + [missing])
    window = ["--from", T1.isoformat(), "--to", T2.isoformat(), "-q"]

    code, out = await run_cli(stack, "reconcile", *window, "--out", str(tmp_path / "r.json"))
    assert code == 1, out
    assert "missing_debit" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summary"]["missing_debit"] == 1 and len(doc["items"]) == 1
    assert doc["items"][0]["event_id"] == str(missing.event_id) and doc["items"][0]["correction_credits"] == 5

    code, out = await run_cli(stack, "repair", *window)
    assert code == 1 and "dry run" in out, out
    code, out = await run_cli(stack, "repair", *window, "--apply", "--out", str(tmp_path / "c.csv"))
    assert code == 0 and "1 new correction entries written" in out, out
    assert str(missing.event_id) in (tmp_path / "c.csv").read_text()

    code, out = await run_cli(
        stack,
        "reconcile",
        *window,
        "--out",
        str(tmp_path / "r.csv"),
        program=(str(Path(sys.executable).parent / "byok-finance"),),
    )
    assert code == 0, out
    assert (tmp_path / "r.csv").read_text().strip().count("\n") == 0  # the header only

    code, out = await run_cli(stack, "replay", "--into", scratch, "-q")
    assert code == 0, out

    code, out = await run_cli(stack, "reconcile", "--from", T2.isoformat(), "--to", T1.isoformat())
    assert code == 2 and "empty" in out, out


async def test_events_the_credit_service_has_not_reached_are_not_yet_decided_not_missing(stack):
    group = "finance-test-credits-" + uuid.uuid4().hex[:6]
    settings = settings_of(stack, finance_credits_group=group)
    reached, not_reached = event(user_id="frank"), event(user_id="frank")  # one key: one partition
    await produce(stack, [reached, not_reached])
    report = await reconcile(settings, WINDOW)
    # The group never consumed the topic: nothing tells lag from loss, so both are missing.
    assert sorted(d.kind for d in report.differences) == [Kind.MISSING_DEBIT] * 2 and report.pending == []

    # The credit service's group has committed past `reached` only.
    first = next(d for d in report.differences if d.event_id == reached.event_id)
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tp = TopicPartition(settings.model_call_completed_topic, first.partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=stack.kafka_bootstrap, group_id=settings.topic(group), enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: first.offset + 1})
    finally:
        await consumer.stop()

    report = await reconcile(settings, WINDOW)
    assert [(d.kind, d.event_id) for d in report.differences] == [(Kind.MISSING_DEBIT, reached.event_id)]
    assert [(d.kind, d.event_id) for d in report.pending] == [(Kind.NOT_YET_DECIDED, not_reached.event_id)]
    fix = await repair(settings, WINDOW, apply=True)
    assert [c.event_id for c in fix.corrections] == [reached.event_id] and fix.written == 1


async def test_bad_input_in_the_log_is_reported_never_a_crash(stack):
    good = event()
    conn = await stack.connect()
    await record_correctly(conn, [good])
    await conn.close()
    at = T1 + timedelta(hours=1)
    bad = [
        Raw(b"", at),
        Raw(b"\xff\xfe not utf-8", at),
        Raw(b"[1, 2, 3]", at),
        Raw(b"null", at),
        Raw(b'{"event_id": "' + b"x" * 70_000 + b'"}', at),  # larger than any consumer here accepts
        Raw(good.to_json().replace(b'"input_tokens":10', b'"input_tokens":-10'), at),
        Raw(good.to_json().replace(b'"openai"', b'"not-a-provider"'), at),
        Raw(event(user_id="nuluser").to_json().replace(b"nuluser", b"nul\\u0000user"), at),  # NUL: refused
    ]
    await produce(stack, [good] + bad)

    report = await reconcile(settings_of(stack), WINDOW)

    assert [d.kind for d in report.differences] == [Kind.UNREADABLE_EVENT] * len(bad)
    assert report.tally.in_window == 1 and report.tally.unreadable == len(bad)
    # Two of them name the good event's id: its debit is still matched to the good delivery.
    assert all(d.ledger_credits == 0 for d in report.differences)


async def test_a_window_without_events_reads_nothing_and_is_clean(stack):
    await produce(stack, [event()])
    report = await reconcile(settings_of(stack), Window(T1 - timedelta(days=30), T1 - timedelta(days=29)))
    assert report.clean and report.tally.records == 0 and report.log_records_planned == 0
    # ... but a debit recorded in that period with no event is still found
    conn = await stack.connect()
    ghost = uuid.uuid4()
    await entry(conn, event_id=ghost, occurred_at=T1 - timedelta(days=29, hours=12))
    await conn.close()
    report = await reconcile(settings_of(stack), Window(T1 - timedelta(days=30), T1 - timedelta(days=29)))
    assert [(d.kind, d.event_id) for d in report.differences] == [(Kind.DEBIT_WITH_NO_EVENT, ghost)]


async def test_replay_catches_a_balance_that_drifted_from_its_entries(stack, scratch):
    events = varied_events(12)
    conn = await stack.connect()
    await record_correctly(conn, events)
    # Bypass the ledger's guard triggers (as only a superuser can) to make carol's sum drift
    # from her entries: every entry is still right, so reconcile sees nothing; replay does.
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("UPDATE accounts SET debited = debited + 11 WHERE user_id = 'carol'")
    await conn.close()
    await produce(stack, events)

    assert (await reconcile(settings_of(stack), WINDOW)).clean
    result = await replay(settings_of(stack), scratch)
    assert [(d.user_id, d.live_debited - d.replay_debited, d.delta) for d in result.differences] == [("carol", 11, -11)]


class RecordingProgress:
    def __init__(self):
        self.total, self.done, self.description = None, 0, ""

    def start(self, total, description):
        self.total, self.description = total, description

    def advance(self, n):
        self.done += n


async def test_progress_is_reported_against_the_planned_total(stack):
    events = varied_events(30)
    await produce(stack, events)
    progress = RecordingProgress()
    report = await reconcile(settings_of(stack), WINDOW, progress)
    assert progress.total == progress.done == report.tally.records == 30
    assert stack.topic_prefix in progress.description


async def test_reconcile_reports_leaking_and_old_holds_and_repair_releases_only_the_leaks(stack):
    from services.credits.ledger import Ledger

    conn = await stack.connect()
    pool = await asyncpg.create_pool(
        stack.database_url, min_size=1, max_size=2, server_settings={"search_path": stack.database_schema}
    )
    try:
        ledger = Ledger(pool)
        await ledger.grant("g:hal", "hal", "free", 50)
        clean = await reconcile(settings_of(stack), WINDOW)
        assert clean.clean and clean.old_holds == [] and clean.decided_holds == [] and clean.conflicts == []
        # A hold open for two hours: its event may still come (an outbox waiting for Kafka), so it is
        # reported, never released by age (holds do not expire, migrations/0014).
        old = uuid.uuid4()
        await conn.execute(
            """INSERT INTO holds (event_id, user_id, credits, feature, provider, model, price_list_version, placed_at)
               VALUES ($1, 'hal', 5, 'chat', 'openai', 'gpt-4o', '2026-01', now() - interval '2 hours')""",
            old,
        )
        # A hold whose event was decided without settling it: the database settles holds itself
        # (migrations/0011), so only a database with that trigger switched off can leak one.
        forgotten = event(user_id="hal", occurred_at=T1 + timedelta(minutes=1))
        await ledger.place_hold(
            forgotten.event_id, "hal", 5, "2026-01", feature="chat", provider="openai", model="gpt-4o"
        )
        async with conn.transaction():
            await conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_settle_holds")
            await conn.execute(
                """INSERT INTO ledger_entries (entry_id, event_id, kind, user_id, decision, credits,
                                                             price_list_version, occurred_at)
                                  VALUES ($1, $1, 'decision', 'hal', 'not_billed_failed', 0, '2026-01', $2)""",
                forgotten.event_id,
                forgotten.occurred_at,
            )
            await conn.execute("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_settle_holds")
        report = await reconcile(settings_of(stack), WINDOW)
        assert not report.clean
        assert [h["event_id"] for h in report.old_holds] == [old]
        assert [h["event_id"] for h in report.decided_holds] == [forgotten.event_id]
        assert (await ledger.balance("hal")).held == 10
        dry = await repair(settings_of(stack), WINDOW)
        assert dry.holds_released == 0 and (await ledger.balance("hal")).held == 10  # a dry run changes nothing
        fixed = await repair(settings_of(stack), WINDOW, apply=True)
        assert fixed.holds_released == 1
        after = await ledger.balance("hal")
        assert (after.held, after.balance) == (5, 50)  # the leak released, never debited; the old hold stays
        again = await reconcile(settings_of(stack), WINDOW)
        assert again.clean and again.decided_holds == [] and [h["event_id"] for h in again.old_holds] == [old]
        # Operators list old holds with their event ids (byok-finance holds).
        code, out = await run_cli(stack, "holds", "--older-than", "3600")
        assert code == 1 and str(old) in out and str(forgotten.event_id) not in out, out
        code, out = await run_cli(stack, "holds", "--older-than", "86400")
        assert code == 0 and "0 admission holds" in out, out
    finally:
        await pool.close()
        await conn.close()


async def test_reconcile_lists_conflicts_the_credit_service_dead_lettered_and_counts_endings(stack, tmp_path):
    """The real credit service dead-letters an event id reused for another call (reason `conflict`);
    reconcile lists it (not a difference: the ledger holds what the first event owes) and so does
    `byok-finance conflicts`; the window's events are counted by ending, `unknown` when they say none."""
    from schemas.events import Ending
    from services.credits.bootstrap import running
    from services.credits.settings import CreditSettings
    from tests.support import wait_for

    first = event(user_id="kim", ending=Ending.COMPLETED)
    stopped = event(user_id="kim", ending=Ending.STOPPED, occurred_at=T1 + timedelta(hours=2))
    not_started = event(
        user_id="kim", status=CallStatus.FAILED, ending=Ending.NOT_STARTED, occurred_at=T1 + timedelta(hours=2)
    )
    older = event(user_id="kim", occurred_at=T1 + timedelta(hours=3))  # an emitter that does not say
    reused = first.model_copy(update={"user_id": "lou", "model": "o1"})
    resent = first.model_copy(update={"latency_ms": 999})
    async with running(stack.settings(CreditSettings)) as runtime:
        await produce(stack, [first, stopped, not_started, older])

        async def decided() -> bool:
            return (await runtime.ledger.decision_of(older.event_id)) is not None

        await wait_for(decided, what="the events decided")
        await produce(stack, [reused, resent])
        found: list = []

        async def dead_lettered() -> bool:
            found[:] = (await reconcile(settings_of(stack), WINDOW)).conflicts
            return bool(found)

        await wait_for(dead_lettered, timeout_s=30, every_s=0.5, what="the conflict in the DLQ")
        await runtime.consumer.pipeline.drain()

    report = await reconcile(settings_of(stack), WINDOW)
    assert report.clean, report.differences  # the ledger holds what the first event owes
    (conflict,) = report.conflicts
    assert (conflict.event_id, conflict.user_id, conflict.model) == (first.event_id, "lou", "o1")
    assert "user_id kim (decided) vs lou" in conflict.error and conflict.source_offset is not None
    assert report.tally.ending_counts() == {
        "completed": 1,
        "provider_error": 0,
        "timeout": 0,
        "stopped": 1,
        "interrupted": 0,
        "not_started": 1,
        "unknown": 1,  # the re-sent event is a redelivery of `first`, counted once
    }
    out_file = tmp_path / "r.json"
    code, out = await run_cli(
        stack, "reconcile", "--from", T1.isoformat(), "--to", T2.isoformat(), "--out", str(out_file)
    )
    assert code == 0 and "not_started" in out and "conflicting duplicates" in out and str(first.event_id) in out, out
    header = json.loads(out_file.read_text())
    assert header["endings"]["unknown"] == 1 and [c["event_id"] for c in header["conflicts"]] == [str(first.event_id)]
    code, out = await run_cli(stack, "conflicts", "--from", T1.isoformat(), "--to", T2.isoformat())
    assert code == 1 and str(first.event_id) in out and "lou" in out, out
    code, out = await run_cli(stack, "conflicts", "--from", T2.isoformat())
    assert code == 0, out
