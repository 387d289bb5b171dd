"""docs/asyncapi.json is generated from the code by `faststream docs gen`; this fails when it drifts."""

import json
from pathlib import Path

import pytest

from schemas.asyncapi import document

pytestmark = pytest.mark.unit

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


def test_the_committed_asyncapi_document_matches_the_code():
    assert json.loads(COMMITTED.read_text()) == document(), "regenerate it with `make asyncapi`"


def test_the_document_names_every_topic_and_message_of_the_contract():
    doc = document()
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {
        "model_call_completed",
        "credit_ledger",
        "key_check_requests",
        "key_check_replies",
        "model_call_completed.dlq",
        "key_check_requests.dlq",
    } <= addresses
    props = doc["components"]["schemas"]["ModelCallCompleted"]["properties"]
    assert {"event_id", "key_source", "feature", "status", "input_tokens"} <= set(props)
