"""Turns raw Kafka records into events, or into dead letters saying why not."""

from __future__ import annotations

from typing import NamedTuple

from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from schemas.events import ModelCallCompleted
from services.shared.kafka import MAX_EVENT_BYTES, DeadLetter


class Received(NamedTuple):  # a tuple: thousands are made per batch, and a frozen dataclass is slow to build
    event: ModelCallCompleted
    record: ConsumerRecord


def dead_letter(record: ConsumerRecord, error: str, error_type: str) -> DeadLetter:
    return DeadLetter(record.topic, record.partition, record.offset, record.key, record.value, error, error_type)


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def read_batch(records: list[ConsumerRecord]) -> tuple[list[Received], list[DeadLetter]]:
    """Validate every record on its own; one bad record never spoils the others."""
    good: list[Received] = []
    bad: list[DeadLetter] = []
    for record in records:
        value = record.value
        if not value:
            bad.append(dead_letter(record, "empty value", "empty"))
        elif len(value) > MAX_EVENT_BYTES:
            bad.append(dead_letter(record, f"value of {len(value)} bytes exceeds {MAX_EVENT_BYTES}", "too_large"))
        else:
            try:
                good.append(Received(ModelCallCompleted.from_json(value), record))
            except ValidationError as exc:
                kind = "malformed_json" if any(e["type"] == "json_invalid" for e in exc.errors()) else "schema"
                bad.append(dead_letter(record, _validation_summary(exc), kind))
    return good, bad
