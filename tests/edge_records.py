"""Records at the edges of `model_call_completed`: hand-picked classes and a hypothesis strategy.

Used by the property tests of intake and the ledger, and by the test that runs them all through the
credit service on the real broker and database.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from hypothesis import strategies as st


def valid_fields(**overrides) -> dict:
    fields = {
        "event_id": str(uuid.uuid4()),
        "schema_version": 1,
        "occurred_at": datetime.now(timezone.utc).isoformat(),
        "user_id": "edge-user",
        "session_id": "s1",
        "request_id": uuid.uuid4().hex,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "feature": "chat",
        "key_source": "platform",
        "status": "succeeded",
        "input_tokens": 10,
        "output_tokens": 20,
        "latency_ms": 5,
    }
    fields.update(overrides)
    return fields


class EdgeRecord(NamedTuple):
    edge_class: str
    label: str
    value: bytes
    event_ids: frozenset[str]  # every event id the bytes mention (an accepted record is decided under one)


def _record(edge_class: str, label: str, fields: dict | None = None, raw: bytes | None = None) -> EdgeRecord:
    if raw is None:
        raw = json.dumps(fields).encode()
    ids = frozenset({fields["event_id"]} if fields and isinstance(fields.get("event_id"), str) else set())
    return EdgeRecord(edge_class, label, raw, ids)


def edge_records() -> list[EdgeRecord]:
    """One record per edge case, each with a fresh event id."""
    now = datetime.now(timezone.utc)
    out: list[EdgeRecord] = []

    def field(edge_class: str, label: str, **changes) -> None:
        out.append(_record(edge_class, label, valid_fields(**changes)))

    # dates at the ends of the calendar, with offsets
    for label, when in [
        ("year 1 with +01:00", "0001-01-01T00:30:00+01:00"),
        ("year 9999 with -01:00", "9999-12-31T23:59:59-01:00"),
        ("year 1 UTC", "0001-01-01T00:00:00Z"),
        ("last second before 2020", "2019-12-31T23:59:59Z"),
        ("2020-01-01 UTC (the first allowed)", "2020-01-01T00:00:00Z"),
        ("2020-01-01 at +01:00 (still 2019 in UTC)", "2020-01-01T00:30:00+01:00"),
        ("+14:00 offset", "2024-06-01T12:00:00+14:00"),
        ("-12:00 offset", "2024-06-01T12:00:00-12:00"),
        ("23 h ahead", (now + timedelta(hours=23)).isoformat()),
        ("2 days ahead", (now + timedelta(days=2)).isoformat()),
        ("naive", "2024-06-01T12:00:00"),
        ("30 February", "2024-02-30T00:00:00Z"),
        ("leap second", "2016-12-31T23:59:60Z"),
        ("epoch number", 1_700_000_000),
        ("empty string", ""),
    ]:
        field("date", label, occurred_at=when)
    # integer limits, floats and strings for numbers
    for name in ("input_tokens", "latency_ms"):
        for label, number in [
            ("2^31", 2**31),
            ("2^63", 2**63),
            ("2^64", 2**64),
            ("-1", -1),
            ("float 1.0", 1.0),
            ("float 1.5", 1.5),
            ("1e308", 1e308),
            ("string '12'", "12"),
            ("true", True),
            ("null", None),
        ]:
            field("number", f"{name} = {label}", **{name: number})
    field("number", "input_tokens = 10^9 (the largest allowed)", input_tokens=10**9)
    field("number", "input_tokens = 10^9 + 1", input_tokens=10**9 + 1)
    field("number", "latency_ms = one day (the largest allowed)", latency_ms=86_400_000)
    field("number", "latency_ms = one day + 1 ms", latency_ms=86_400_001)
    # huge and odd unicode ids
    for label, text in [
        ("200 characters", "u" * 200),
        ("201 characters", "u" * 201),
        ("10,000 characters", "u" * 10_000),
        ("emoji", "us\U0001f600er"),
        ("right-to-left", "\u05de\u05e9\u05ea\u05de\u05e9"),
        ("combining marks", "e\u0301\u0301\u0301"),
        ("zero-width space", "a\u200bb"),
        ("NUL", "al\x00ice"),
        ("control DEL", "a\x7f"),
        ("C1 control NEL", "a\x85"),
        ("line separator", "a\u2028b"),
        ("private use", "a\ue000"),
        ("unassigned", "a\U000e0fff"),
        ("single space", " "),
        ("empty", ""),
    ]:
        field("id", f"user_id {label}", user_id=text)
    for label, model in [
        ("path traversal", "../../openai/v1/chat/completions?x="),
        ("slash", "models/gemini-2.5-pro"),
        ("101 characters", "g" * 101),
        ("unicode", "gpt-4o\u2013mini"),
        ("empty", ""),
        ("colon and dots (allowed)", "gpt-4o-mini:2024.07"),
    ]:
        field("model", f"model {label}", model=model)
    # JSON oddities
    lone = valid_fields()
    raw = json.dumps(lone).replace('"edge-user"', '"edge\\ud800user"').encode()
    out.append(_record("json", "lone surrogate escape in user_id", lone, raw))
    first, second = valid_fields(), str(uuid.uuid4())
    raw = json.dumps(first)[:-1].encode() + f', "event_id": "{second}"}}'.encode()
    rec = _record("json", "duplicate key event_id", first, raw)
    out.append(rec._replace(event_ids=rec.event_ids | {second}))
    out.append(_record("json", "deep nesting (10,000 levels)", raw=b"[" * 10_000 + b"]" * 10_000))
    nested = valid_fields()
    out.append(
        _record(
            "json",
            "deep nesting in a field",
            nested,
            json.dumps(nested)[:-1].encode() + b', "extra": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
        )
    )
    out.append(_record("json", "empty object", raw=b"{}"))
    out.append(_record("json", "array", raw=b"[]"))
    out.append(_record("json", "null", raw=b"null"))
    out.append(_record("json", "a bare number", raw=b"123"))
    unknown = valid_fields(future_field={"a": 1})
    out.append(_record("json", "unknown extra field (ignored, accepted)", unknown))
    # bytes that are not UTF-8, and sizes
    out.append(_record("bytes", "invalid UTF-8", raw=b"\xff\xfe\xfd"))
    bad_utf8 = valid_fields()
    out.append(
        _record(
            "bytes",
            "invalid UTF-8 inside a string",
            bad_utf8,
            json.dumps(bad_utf8).replace("edge-user", "edge-\udcffuser").encode("utf-8", "surrogateescape"),
        )
    )
    out.append(_record("bytes", "empty value", raw=b""))
    out.append(_record("bytes", "1 MB", raw=b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'))
    return out


# --- a hypothesis strategy for events near the bounds -----------------------------------------------

_NOW = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
_ID_TEXT = st.text(st.characters(codec="utf-8"), min_size=0, max_size=210)


@st.composite
def event_fields(draw) -> dict:
    """An event's fields, each drawn near and across its bound. Most fields stay valid in most draws, so
    both acceptances and refusals occur often (a test below checks the mix)."""
    now = _NOW  # fixed: hypothesis needs the same bounds at every draw

    def mostly(valid, wild):  # 3 draws in 4 keep the field valid
        return draw(st.one_of(valid, wild) if draw(st.integers(0, 3)) == 0 else valid)

    tz = timezone(timedelta(minutes=draw(st.integers(-14 * 60, 14 * 60))))
    moment = mostly(
        st.datetimes((now - timedelta(days=2)).replace(tzinfo=None), (now + timedelta(hours=20)).replace(tzinfo=None)),
        st.one_of(
            st.datetimes(datetime(2019, 12, 30), datetime(2020, 1, 2)),
            st.datetimes(
                (now + timedelta(hours=20)).replace(tzinfo=None), (now + timedelta(days=2)).replace(tzinfo=None)
            ),
            st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30)),
        ),
    )
    return valid_fields(
        event_id=str(draw(st.uuids())),
        occurred_at=moment.replace(tzinfo=tz).isoformat(),
        user_id=mostly(st.sampled_from(["edge-user", "edge user 2", "\u00e9dge-\U0001f600"]), _ID_TEXT),
        session_id=mostly(st.just("s1"), _ID_TEXT),
        model=mostly(
            st.sampled_from(["gpt-4o-mini", "claude-3-5-haiku", "o1", "nope"]),
            st.from_regex(r"[A-Za-z0-9._:\-/ ]{0,102}", fullmatch=True),
        ),
        input_tokens=mostly(
            st.integers(0, 10),
            st.one_of(st.integers(-2, 0), st.integers(10**9 - 2, 10**9 + 2), st.integers(-(2**64), 2**64)),
        ),
        output_tokens=draw(st.integers(0, 100)),
        latency_ms=mostly(st.integers(0, 10), st.integers(86_400_000 - 2, 86_400_000 + 2)),
        feature=draw(st.sampled_from(["chat", "deep_analysis", "code_fix", "code_canvas"])),
        key_source=draw(st.sampled_from(["byok", "platform"])),
        status=draw(st.sampled_from(["succeeded", "failed"])),
    )


event_fields.FIELDS = tuple(valid_fields())
