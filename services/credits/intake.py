"""Turns raw Kafka records into events, or into dead letters saying why not."""

from __future__ import annotations

from typing import NamedTuple, TypeAlias

from aiokafka.structs import ConsumerRecord

from schemas.events import ModelCallCompleted
from services.shared.kafka import DeadLetter, NotAnEvent, read_model_call

# A record as the credit consumer gets it: no deserializer, so key and value are bytes (or None).
Record: TypeAlias = ConsumerRecord[bytes, bytes]


class Received(NamedTuple):  # a tuple: thousands are made per batch, and a frozen dataclass is slow to build
    event: ModelCallCompleted
    record: Record


def read_batch(records: list[Record]) -> tuple[list[Received], list[DeadLetter]]:
    """Validate every record on its own; one bad record never spoils the others."""
    good: list[Received] = []
    bad: list[DeadLetter] = []
    for record in records:
        read = read_model_call(record.value)
        if isinstance(read, NotAnEvent):
            bad.append(DeadLetter.of(record, read.message, read.kind))
        else:
            good.append(Received(read, record))
    return good, bad
