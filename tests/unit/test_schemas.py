import json
import uuid
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from schemas import (
    CreditOutcome,
    Decision,
    KeyCheckRequest,
    KeyCheckResult,
    KeyCheckStatus,
    ModelCallCompleted,
    Provider,
)
from tests.support import make_event

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def as_dict(event: ModelCallCompleted) -> dict:
    return json.loads(event.to_json())


@pytest.mark.parametrize(
    "model",
    [
        make_event(),
        CreditOutcome(
            event_id=uuid.uuid4(),
            user_id="u",
            decision=Decision.DEBITED,
            credits=5,
            balance_after=-3,
            price_list_version="2026-01",
            decided_at=NOW,
        ),
        CreditOutcome(
            event_id=uuid.uuid4(), user_id="u", decision=Decision.REJECTED, reason="unpriced", credits=0, decided_at=NOW
        ),
        KeyCheckRequest(
            request_id=uuid.uuid4(),
            user_id="u",
            provider=Provider.GROQ,
            sealed_key="c2VhbGVk",
            key_id="k1",
            requested_at=NOW,
        ),
        KeyCheckResult(
            request_id=uuid.uuid4(),
            provider=Provider.GEMINI,
            status=KeyCheckStatus.QUOTA_EXHAUSTED,
            message="Your Gemini key has no quota left.",
            key_hint="AIza…a1b2",
            checked_at=NOW,
            latency_ms=3,
        ),
    ],
)
def test_json_round_trip_gives_back_the_same_value(model):
    assert type(model).from_json(model.to_json()) == model


@pytest.mark.parametrize(
    "field,value",
    [
        ("input_tokens", "12"),  # no silent coercion of a string to an int
        ("input_tokens", -1),  # no negative tokens
        ("output_tokens", 1.5),
        ("provider", "mistral"),  # no unknown provider
        ("feature", "summarise"),  # no unknown feature
        ("status", "partial"),  # no unknown status
        ("key_source", "shared"),
        ("event_id", "not-a-uuid"),
        ("occurred_at", "2026-11-27T12:00:00"),  # a time without a zone is ambiguous
        ("schema_version", 2),
        ("user_id", ""),
        ("user_id", "al\x00ice"),  # PostgreSQL text cannot hold a NUL: refused here, not at COPY time
        ("model", "gpt-4o\n"),
        ("latency_ms", True),  # a bool is not a count
    ],
)
def test_bad_values_are_refused(field, value):
    data = as_dict(make_event())
    data[field] = value
    with pytest.raises(ValidationError) as info:
        ModelCallCompleted.from_json(json.dumps(data))
    assert field in str(info.value)


@pytest.mark.parametrize("missing", ["event_id", "user_id", "provider", "key_source", "status", "input_tokens"])
def test_required_fields_are_required(missing):
    data = as_dict(make_event())
    del data[missing]
    with pytest.raises(ValidationError):
        ModelCallCompleted.from_json(json.dumps(data))


def test_a_newer_emitter_may_add_optional_fields():
    data = as_dict(make_event()) | {"region": "eu"}
    assert ModelCallCompleted.from_json(json.dumps(data)).user_id == "alice"


def test_malformed_json_is_refused():
    with pytest.raises(ValidationError):
        ModelCallCompleted.from_json(b'{"event_id": ')


def test_an_outcome_reason_goes_with_rejection_only_and_credits_with_debits_only():
    with pytest.raises(ValidationError):
        CreditOutcome(event_id=uuid.uuid4(), user_id="u", decision=Decision.REJECTED, credits=0)
    with pytest.raises(ValidationError):
        CreditOutcome(event_id=uuid.uuid4(), user_id="u", decision=Decision.NOT_BILLED_BYOK, credits=5)


def test_a_key_check_result_status_must_be_known():
    with pytest.raises(ValidationError):
        KeyCheckResult.model_validate_json(
            json.dumps({"request_id": str(uuid.uuid4()), "provider": "openai", "status": "maybe", "message": "?"})
        )


def test_one_reader_says_what_each_unreadable_value_is():
    from services.shared.kafka import MAX_EVENT_BYTES, NotAnEvent, read_model_call

    good = make_event(input_tokens=1)
    assert read_model_call(good.to_json()) == good
    cases = {
        b"": "empty",
        None: "empty",
        b"x" * (MAX_EVENT_BYTES + 1): "too_large",
        b"{not json": "malformed_json",
        good.to_json().replace(b'"input_tokens":1', b'"input_tokens":-1'): "schema",
    }
    for value, kind in cases.items():
        read = read_model_call(value)
        assert isinstance(read, NotAnEvent) and read.kind == kind, (value[:40] if value else value, read)
        assert read.message
    negative = read_model_call(good.to_json().replace(b'"input_tokens":1', b'"input_tokens":-1'))
    assert negative.message.startswith("input_tokens:")
