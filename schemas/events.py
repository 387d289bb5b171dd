"""Event and reply models shared by every part (contract, see DESIGN.md "Events").

Strict on the way in: no silent coercion of bad types, no unknown enum values, no
negative counts, no unknown fields. Change only by adding optional fields.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

NonNegativeInt = Annotated[int, Field(ge=0)]
# No control characters: a NUL cannot be stored in PostgreSQL text, and none belongs in an id or a
# model name; refusing them here sends such an event to the DLQ instead of stalling a consumer.
Identifier = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Provider(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GROQ = "groq"
    GEMINI = "gemini"


class Feature(StrEnum):
    CHAT = "chat"
    DEEP_ANALYSIS = "deep_analysis"
    CODE_FIX = "code_fix"
    CODE_CANVAS = "code_canvas"


class KeySource(StrEnum):
    BYOK = "byok"
    PLATFORM = "platform"


class CallStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Decision(StrEnum):
    DEBITED = "debited"
    NOT_BILLED_BYOK = "not_billed_byok"
    NOT_BILLED_FAILED = "not_billed_failed"
    REJECTED = "rejected"


class KeyCheckStatus(StrEnum):
    VALID = "valid"
    INVALID = "invalid"
    REVOKED_OR_EXPIRED = "revoked_or_expired"
    PERMISSION_DENIED = "permission_denied"
    QUOTA_EXHAUSTED = "quota_exhausted"
    RATE_LIMITED = "rate_limited"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    MALFORMED = "malformed"


class Contract(BaseModel):
    """Base of every wire model: strict types, immutable."""

    # Unknown fields are ignored, not refused: the contract grows only by optional fields, and an
    # older consumer must keep accepting events from a newer emitter.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    @classmethod
    def from_json(cls, raw: bytes | str):
        # JSON has no UUID/datetime/enum types, so strict mode accepts their string forms
        # when parsing JSON (and still refuses e.g. "12" for an int).
        # The compiled validator itself: model_validate_json adds only keyword handling around it,
        # which is a third of the cost per event on the credit service's hot path.
        return cls.__pydantic_validator__.validate_json(raw)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class ModelCallCompleted(Contract):
    """One finished model call, as published by the emitter (chat service or any other)."""

    event_id: UUID
    schema_version: Literal[1] = 1
    occurred_at: AwareDatetime
    user_id: Identifier
    session_id: Identifier
    request_id: Identifier
    provider: Provider
    model: Identifier
    feature: Feature
    key_source: KeySource
    status: CallStatus
    input_tokens: NonNegativeInt
    output_tokens: NonNegativeInt
    latency_ms: NonNegativeInt


class CreditOutcome(Contract):
    """What the credit service decided for one `ModelCallCompleted`."""

    event_id: UUID
    user_id: Identifier
    decision: Decision
    reason: str | None = None
    credits: NonNegativeInt
    balance_after: int | None = None
    price_list_version: str | None = None
    decided_at: AwareDatetime = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _reason_iff_rejected(self) -> CreditOutcome:
        if (self.decision is Decision.REJECTED) != bool(self.reason):
            raise ValueError("a reason is given exactly when the decision is 'rejected'")
        if self.decision is not Decision.DEBITED and self.credits != 0:
            raise ValueError("only a 'debited' outcome carries credits")
        return self


class KeyCheckRequest(Contract):
    """A request to check one key; the key is sealed to the worker's public key `key_id`."""

    request_id: UUID
    user_id: Identifier
    provider: Provider
    sealed_key: Annotated[str, Field(min_length=1, max_length=4096)]
    key_id: Identifier
    requested_at: AwareDatetime = Field(default_factory=utc_now)


class KeyCheckResult(Contract):
    """The worker's answer to a `KeyCheckRequest`; never carries the key, only its hint."""

    request_id: UUID
    provider: Provider
    status: KeyCheckStatus
    message: Annotated[str, Field(min_length=1)]
    key_hint: str | None = None
    checked_at: AwareDatetime = Field(default_factory=utc_now)
    latency_ms: NonNegativeInt = 0
