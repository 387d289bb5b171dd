"""Finance's domain without services: windows, the classification of differences, corrections,
reading records, and the report files."""

from __future__ import annotations

import csv
import json
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from billing.pricing import default_price_book
from schemas.events import CallStatus, Ending, Feature, KeySource, ModelCallCompleted, Provider
from services.finance.assessment import EVENT_COLUMNS, Assessor, Tally
from services.finance.differences import Difference, Kind, classify, correction_for, correction_id
from services.finance.reconciliation import ReconcileReport
from services.finance.report import write_report
from services.finance.window import Window, to_ms
from tests.support import make_event

pytestmark = pytest.mark.unit

T1 = datetime(2026, 11, 1, tzinfo=timezone.utc)
T2 = datetime(2026, 11, 2, tzinfo=timezone.utc)
US = timedelta(microseconds=1)


def event(**overrides) -> ModelCallCompleted:
    """A succeeded platform call by alice, an hour into the window."""
    return make_event(**({"occurred_at": T1 + timedelta(hours=1)} | overrides))


def record(value: bytes | None, ts: datetime = T1 + timedelta(hours=1), partition: int = 0, offset: int = 0):
    return SimpleNamespace(value=value, timestamp=to_ms(ts), partition=partition, offset=offset)


# --- the window -----------------------------------------------------------------------------------


def test_window_is_half_open_on_occurred_at():
    w = Window(T1, T2)
    assert w.contains(T1)
    assert w.contains(T2 - US)
    assert not w.contains(T2)
    assert not w.contains(T1 - US)


def test_window_is_half_open_on_kafka_timestamps_too():
    w = Window(T1, T2)
    assert w.contains_ms(to_ms(T1)) and w.contains_ms(to_ms(T2) - 1)
    assert not w.contains_ms(to_ms(T2)) and not w.contains_ms(to_ms(T1) - 1)


def test_window_takes_naive_times_as_utc_and_refuses_an_empty_window():
    assert Window(datetime(2026, 11, 1), T2).start == T1
    with pytest.raises(ValueError, match="empty"):
        Window(T2, T1)
    with pytest.raises(ValueError, match="empty"):
        Window(T1, T1)


def test_log_range_widens_the_window_by_skew_and_lateness():
    lo, hi = Window(T1, T2).log_range_ms(timedelta(minutes=5), timedelta(hours=1))
    assert lo == to_ms(T1) - 300_000 and hi == to_ms(T2) + 3_600_000


def test_log_range_reaches_the_newest_ledger_entry_of_the_window_however_late():
    skew, lateness = timedelta(minutes=5), timedelta(hours=1)
    recorded = T2 + timedelta(days=3)  # an event published days late, then debited
    _, hi = Window(T1, T2).log_range_ms(skew, lateness, recorded)
    assert hi == to_ms(recorded + skew) + 1
    _, hi = Window(T1, T2).log_range_ms(skew, lateness, T1 + timedelta(minutes=1))  # never narrower
    assert hi == to_ms(T2) + 3_600_000


# --- classification -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decision", "owed", "net", "debits", "kind"),
    [
        ("debited", 5, 5, 1, None),
        ("debited", 5, 0, 0, Kind.MISSING_DEBIT),
        ("debited", 5, 0, 1, Kind.MISSING_DEBIT),  # debited, then refunded in full
        ("debited", 5, 10, 2, Kind.DOUBLE_DEBIT),
        ("debited", 5, 8, 2, Kind.DOUBLE_DEBIT),
        ("debited", 5, 3, 1, Kind.WRONG_AMOUNT),
        ("debited", 5, 20, 1, Kind.WRONG_AMOUNT),  # one debit at the wrong price
        ("debited", 5, 5, 2, None),  # a wrong debit fixed by a correction
        ("not_billed_byok", 0, 0, 0, None),
        ("not_billed_byok", 0, 5, 1, Kind.BYOK_CALL_DEBITED),
        ("not_billed_failed", 0, 0, 0, None),
        ("not_billed_failed", 0, 5, 1, Kind.FAILED_CALL_DEBITED),
        ("not_billed_byok", 0, 0, 1, None),  # a BYOK debit refunded by a correction
        ("rejected", 0, 5, 1, Kind.WRONG_AMOUNT),
        ("not_billed_byok", 0, -5, 0, Kind.WRONG_AMOUNT),  # an over-refund
    ],
)
def test_classify_an_event_of_the_window(decision, owed, net, debits, kind):
    assert classify(decision, owed, net, debits) is kind


def test_classify_ledger_entries_without_their_event():
    assert classify(None, None, 5, 1) is Kind.DEBIT_WITH_NO_EVENT
    assert classify(None, None, 5, 1, event_in_window=True) is Kind.DEBIT_ON_WRONG_ACCOUNT
    assert classify(None, None, 0, 1) is None  # a stray debit already refunded


# --- corrections ----------------------------------------------------------------------------------


def diff(kind=Kind.DOUBLE_DEBIT, owed=5, net=10, corrections=1, **kw) -> Difference:
    return Difference(
        kind=kind,
        event_id=uuid.UUID(int=7),
        user_id="alice",
        expected_decision="debited",
        expected_credits=owed,
        ledger_credits=net,
        ledger_corrections=corrections,
        price_list_version="2026-01",
        **kw,
    )


def test_a_correction_brings_the_net_to_what_is_owed_with_a_deterministic_id():
    c = correction_for(diff())
    assert c.credits == -5 and c.event_id == uuid.UUID(int=7) and c.user_id == "alice"
    assert c.entry_id == correction_for(diff()).entry_id == correction_id(uuid.UUID(int=7), "alice", 1)
    assert "double_debit" in c.reason
    assert correction_for(diff(kind=Kind.MISSING_DEBIT, net=0, corrections=0)).credits == 5


def test_a_later_difference_on_the_same_event_gets_a_new_correction_id():
    assert correction_for(diff(corrections=1)).entry_id != correction_for(diff(corrections=2)).entry_id
    assert correction_id(uuid.UUID(int=7), "alice", 0) != correction_id(uuid.UUID(int=7), "bob", 0)


def test_a_stray_debit_is_refunded_and_an_unreadable_event_never_repaired():
    stray = Difference(kind=Kind.DEBIT_WITH_NO_EVENT, event_id=uuid.uuid4(), user_id="bob", ledger_credits=20)
    assert correction_for(stray).credits == -20
    unreadable = Difference(kind=Kind.UNREADABLE_EVENT, event_id=uuid.uuid4(), user_id="bob", ledger_credits=5)
    assert correction_for(unreadable) is None


# --- reading records ------------------------------------------------------------------------------


def test_assessor_applies_the_credit_policy():
    events = [
        event(),  # platform chat on a tier-3 model
        event(key_source=KeySource.BYOK),  # BYOK chat: never billed
        event(key_source=KeySource.BYOK, feature=Feature.DEEP_ANALYSIS),  # always billed, 50
        event(status=CallStatus.FAILED),
        event(model="no-such-model"),  # unpriced: rejected, never billed cheap
        event(),  # same shape as the first
    ]
    assessor = Assessor(default_price_book(), Window(T1, T2))
    rows, bad, tally = assessor.assess([record(e.to_json(), offset=i) for i, e in enumerate(events)])
    got = [dict(zip(EVENT_COLUMNS, r, strict=True)) for r in rows]
    shapes = assessor.shapes.shapes
    assert [(shapes[g["shape"]].decision, g["credits"]) for g in got] == [
        ("debited", 5),
        ("not_billed_byok", 0),
        ("debited", 50),
        ("not_billed_failed", 0),
        ("rejected", 0),
        ("debited", 5),
    ]
    assert len(shapes) == 5 and got[5]["shape"] == got[0]["shape"]
    assert all(sh.price_list_version == "2026-01" for sh in shapes)
    assert "no-such-model" in shapes[got[4]["shape"]].reason
    assert got[0]["event_id"] == events[0].event_id and got[4]["off"] == 4
    assert bad == [] and tally.in_window == 6 and tally.records == 6


def test_redeliveries_are_one_event_the_first_delivery():
    e = event()
    assessor = Assessor(default_price_book(), Window(T1, T2))
    rows, _, tally = assessor.assess([record(e.to_json(), offset=3), record(e.to_json(), offset=9)])
    rows2, _, tally2 = assessor.assess([record(e.to_json(), offset=12)])  # a later batch
    assert [r[-1] for r in rows] == [3] and rows2 == []
    assert (tally.in_window, tally.duplicates, tally2.duplicates) == (2, 1, 1)
    assert assessor.has_event(e.event_id) and not assessor.has_event(uuid.uuid4())


def test_unreadable_records_are_findings_not_crashes():
    eid = uuid.uuid4()
    half = json.dumps({"event_id": str(eid), "user_id": "alice"}).encode()  # valid JSON, not an event
    records = [
        record(b"{not json", offset=1),
        record(None, offset=2),
        record(b"", offset=3),
        record(b"x" * (64 * 1024 + 1), offset=4),
        record(half, offset=5),
        record(json.dumps({"event_id": "nope"}).encode(), offset=6),
        record(event().to_json(), offset=7),
        record(event(user_id="ab").to_json().replace(b'"ab"', b'"a\\u0000b"'), offset=8),  # NUL: refused
        record(event().to_json().replace(b'"input_tokens":1', b'"input_tokens":-1'), offset=9),
        record(event().to_json().replace(b'"input_tokens":1', b'"input_tokens":"1"'), offset=10),
    ]
    rows, bad, tally = Assessor(default_price_book(), Window(T1, T2)).assess(records)
    assert len(rows) == 1 and [b.offset for b in bad] == [1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert "user_id" in bad[6].error and "pattern" in bad[6].error
    assert bad[4].event_id == eid and bad[0].event_id is None and bad[5].event_id is None
    assert "exceeds" in bad[3].error and "json" in bad[0].error.lower()
    assert tally.unreadable == 9


def test_assessor_keeps_only_the_window():
    w = Window(T1, T2)
    records = [
        record(event(occurred_at=T1).to_json(), offset=0),
        record(event(occurred_at=T2 - US).to_json(), offset=1),
        record(event(occurred_at=T2).to_json(), offset=2),
        record(event(occurred_at=T1 - US).to_json(), offset=3),
        record(b"bad", ts=T2, offset=4),  # an unreadable record is placed by its Kafka timestamp
        record(b"bad", ts=T1, offset=5),
    ]
    rows, bad, tally = Assessor(default_price_book(), w).assess(records)
    assert [r[-1] for r in rows] == [0, 1] and [b.offset for b in bad] == [5]
    assert tally.outside_window == 3
    # without a window (replay) everything is kept
    rows, bad, _ = Assessor(default_price_book()).assess(records)
    assert len(rows) == 4 and len(bad) == 2


def test_events_are_counted_by_ending_once_each_and_unknown_when_they_say_none():
    w = Window(T1, T2)
    stopped = event(ending=Ending.STOPPED)
    records = [
        record(event(ending=Ending.COMPLETED).to_json(), offset=0),
        record(stopped.to_json(), offset=1),
        record(stopped.to_json(), offset=2),  # a redelivery: counted once
        record(event(status=CallStatus.FAILED, ending=Ending.NOT_STARTED).to_json(), offset=3),
        record(event().to_json(), offset=4),  # an older emitter: no ending
        record(event(occurred_at=T2, ending=Ending.TIMEOUT).to_json(), offset=5),  # outside the window
        record(b"bad", offset=6),
    ]
    assessor = Assessor(default_price_book(), w)
    _, _, tally = assessor.assess(records[:3])
    _, _, later = assessor.assess(records[3:])
    tally.add(later)
    assert tally.ending_counts() == {
        "completed": 1,
        "provider_error": 0,
        "timeout": 0,
        "stopped": 1,
        "interrupted": 0,
        "not_started": 1,
        "unknown": 1,
    }
    assert sum(tally.ending_counts().values()) == tally.in_window - tally.duplicates
    assert Tally().ending_counts()["unknown"] == 0


# --- report files -----------------------------------------------------------------------------------


def test_report_files_hold_every_difference(tmp_path):
    diffs = [diff(), Difference(kind=Kind.UNREADABLE_EVENT, event_id=None, user_id=None, detail="bad json")]
    report = ReconcileReport(Window(T1, T2), "model_call_completed", Tally(in_window=3), diffs)
    write_report(tmp_path / "r.csv", report)
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["kind"] for r in rows] == ["double_debit", "unreadable_event"]
    assert rows[0]["correction_credits"] == "-5" and rows[1]["correction_credits"] == ""
    write_report(tmp_path / "r.json", report)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summary"]["double_debit"] == 1 and doc["summary"]["missing_debit"] == 0
    assert doc["window"]["rule"] == "[from, to) on occurred_at"
    assert [i["kind"] for i in doc["items"]] == ["double_debit", "unreadable_event"]
    assert doc["endings"]["unknown"] == 0 and doc["conflicts"] == []
    with pytest.raises(ValueError, match="format"):
        write_report(tmp_path / "r.txt", report)


# --- shapes: decide once per shape ----------------------------------------------------------------


def test_decide_depends_only_on_what_a_shape_is_made_of():
    """`Shapes` computes `decide` once per (price list, status, feature, key source, model); this
    holds it to that: events equal on those and different in everything else owe the same."""
    import itertools

    from billing.policy import decide

    book = default_price_book()
    for status, feature, key_source, model in itertools.product(
        CallStatus, Feature, KeySource, ["gpt-4o", "o1", "claude-3-5-haiku", "unpriced-model"]
    ):
        base = dict(status=status, feature=feature, key_source=key_source, model=model)
        variants = [
            event(**base),
            event(
                **base,
                user_id="someone-else",
                session_id="x",
                request_id="y",
                provider=Provider.GROQ,
                input_tokens=10**9,
                output_tokens=0,
                latency_ms=10**6,
                occurred_at=T2 + timedelta(days=3),
            ),
        ]
        assert len({decide(v, book) for v in variants}) == 1, base


def test_shapes_give_what_decide_gives():
    from billing.policy import decide
    from services.finance.assessment import Shapes

    book = default_price_book()
    shapes = Shapes(book, Window(T1, T2))
    events = [
        event(model=m, feature=f, key_source=k, status=st)
        for m in ("gpt-4o", "o1", "nope")
        for f in Feature
        for k in KeySource
        for st in CallStatus
    ] * 2
    assert [shapes.charge(shapes.of(e)) for e in events] == [decide(e, book) for e in events]
    assert len(shapes.shapes) == len(events) // 2
