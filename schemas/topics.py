"""Kafka topics of the system (contract, see DESIGN.md "Topics")."""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL_CALL_COMPLETED = "model_call_completed"
CREDIT_LEDGER = "credit_ledger"
KEY_CHECK_REQUESTS = "key_check_requests"
KEY_CHECK_REPLIES = "key_check_replies"

FOREVER = "-1"
ONE_HOUR = str(60 * 60 * 1000)
DEFAULT_PARTITIONS = 6


def dlq(topic: str) -> str:
    """Name of the dead-letter topic of `topic`."""
    return f"{topic}.dlq"


# The request/reply headers of a key check (FastStream's wire protocol): the requester names the topic
# to answer on and a correlation id; the worker's reply carries the same correlation id.
REPLY_TO = "reply_to"
CORRELATION_ID = "correlation_id"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    retention_ms: str
    partitions: int = DEFAULT_PARTITIONS
    extra: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        return {"retention.ms": self.retention_ms, **self.extra}


def topic_specs(partitions: int = DEFAULT_PARTITIONS, prefix: str = "") -> list[TopicSpec]:
    """Every topic with its retention; `prefix` isolates tests from each other."""
    forever = [MODEL_CALL_COMPLETED, CREDIT_LEDGER]
    short = [KEY_CHECK_REQUESTS, KEY_CHECK_REPLIES]
    specs = [TopicSpec(prefix + t, FOREVER, partitions) for t in forever]
    specs += [TopicSpec(prefix + t, ONE_HOUR, partitions) for t in short]
    specs += [TopicSpec(dlq(prefix + t), FOREVER, partitions) for t in forever + short]
    return specs
