"""Property-based: no record makes intake raise; whatever it accepts is inside the bounds of input."""

import json
import unicodedata
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from schemas.events import EARLIEST_OCCURRED_AT, MAX_LATENCY_MS, MAX_TOKENS, ModelCallCompleted
from services.shared.kafka import NotAnEvent, read_model_call
from tests.edge_records import event_fields

pytestmark = pytest.mark.unit

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_read(value: bytes) -> ModelCallCompleted | NotAnEvent:
    read = read_model_call(value)  # must not raise, whatever the bytes
    if isinstance(read, NotAnEvent):
        assert read.kind in {"empty", "too_large", "malformed_json", "schema"} and read.message
        return read
    assert EARLIEST_OCCURRED_AT <= read.occurred_at <= datetime.now(timezone.utc) + timedelta(days=1, minutes=1)
    assert 0 <= read.input_tokens <= MAX_TOKENS and 0 <= read.output_tokens <= MAX_TOKENS
    assert 0 <= read.latency_ms <= MAX_LATENCY_MS
    for text in (read.user_id, read.session_id, read.request_id, read.model):
        assert 1 <= len(text) <= 200
        # (Categories whose members do not change between Unicode versions of Python and the Rust regex.)
        assert not any(unicodedata.category(c) in {"Cc", "Cs", "Zl", "Zp"} for c in text), repr(text)
        text.encode()  # no lone surrogate
    read.occurred_at.astimezone(timezone.utc)  # the ledger can store it
    return read


@SETTINGS
@given(st.binary(max_size=2048))
def test_intake_never_raises_on_arbitrary_bytes(value):
    check_read(value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(event_fields(), st.sampled_from(list(event_fields.FIELDS)), json_values)
def test_intake_never_raises_when_one_field_holds_any_json_value(fields, name, value):
    check_read(json.dumps({**fields, name: value}).encode())


@SETTINGS
@given(event_fields())
def test_events_near_the_bounds_are_accepted_or_refused_never_raised(fields):
    check_read(json.dumps(fields).encode())


def test_the_generator_reaches_both_sides_of_the_bounds():
    # Guards the property tests above against a generator that only ever makes refusals (or only valid events).
    refused: list[bool] = []

    @settings(max_examples=200, deadline=None, database=None)
    @given(event_fields())
    def probe(fields):
        refused.append(isinstance(read_model_call(json.dumps(fields).encode()), NotAnEvent))

    probe()
    assert 20 < sum(refused) < len(refused) - 20, (sum(refused), len(refused))


def test_a_valid_event_still_reads():
    event = {
        "event_id": str(uuid.uuid4()),
        "occurred_at": "2020-01-01T00:00:00Z",
        "user_id": "u",
        "session_id": "s",
        "request_id": "r",
        "provider": "groq",
        "model": "llama3-8b-8192",
        "feature": "chat",
        "key_source": "platform",
        "status": "succeeded",
        "input_tokens": MAX_TOKENS,
        "output_tokens": 0,
        "latency_ms": MAX_LATENCY_MS,
    }
    assert isinstance(check_read(json.dumps(event).encode()), ModelCallCompleted)
