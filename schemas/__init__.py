"""Contracts shared by every service: events, replies and topics."""

from schemas.events import (
    CallStatus,
    CreditOutcome,
    Decision,
    Feature,
    KeyCheckRequest,
    KeyCheckResult,
    KeyCheckStatus,
    KeySource,
    ModelCallCompleted,
    Provider,
)

__all__ = [
    "CallStatus",
    "CreditOutcome",
    "Decision",
    "Feature",
    "KeyCheckRequest",
    "KeyCheckResult",
    "KeyCheckStatus",
    "KeySource",
    "ModelCallCompleted",
    "Provider",
]
