"""Event and reply models shared by every part (contract, see DESIGN.md "Events").

Strict on the way in: no silent coercion of bad types, no unknown enum values, no
negative counts, no unknown fields. Change only by adding optional fields.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Annotated, Any, Literal, Self
from uuid import UUID

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

# --- bounds of input (contract, DESIGN.md "Bounds of input") --------------------------------------
# Every value a consumer accepts must also be one the ledger can store: an event that passes the
# schema and then breaks a database write would otherwise be retried forever. Outside these bounds
# an event goes to the DLQ with the reason.

NonNegativeInt = Annotated[int, Field(ge=0)]
MAX_TOKENS = 1_000_000_000
MAX_LATENCY_MS = 86_400_000  # one day
TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
LatencyMs = Annotated[int, Field(ge=0, le=MAX_LATENCY_MS)]

# Printable only: no control (Cc), format (Cf), private-use (Co) or unassigned (Cn) characters and no
# line or paragraph separators. A NUL cannot be stored in PostgreSQL text, and none of these belongs in
# an id. Lone surrogates are refused by the parser itself. (Checked by the compiled validator, in Rust.)
# (An intersection, not one negated class: the Rust regex engine lets private-use characters through
# `[^\p{Co}\p{Cn}]`.)
PRINTABLE = r"^[[^\p{Cc}\p{Cf}\p{Co}\p{Zl}\p{Zp}]&&\P{Cn}]+$"
Identifier = Annotated[str, Field(min_length=1, max_length=200, pattern=PRINTABLE)]
# A model id is also a URL path segment at some providers: nothing that could leave the segment.
MODEL_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,100}$"
ModelId = Annotated[str, Field(min_length=1, max_length=100, pattern=MODEL_ID_PATTERN)]

EARLIEST_OCCURRED_AT = datetime(2020, 1, 1, tzinfo=timezone.utc)
# How far in the future an event may say it happened (clock skew between emitters); BYOK_EVENT_MAX_FUTURE_S.
MAX_FUTURE = timedelta(seconds=float(os.environ.get("BYOK_EVENT_MAX_FUTURE_S", 86_400)))


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# (until, latest): `utc_now() + MAX_FUTURE`, read from the clock at most once a second. The bound is a day
# wide, and reading the wall clock for every event was 8 % of the credit service's intake (issue 22).
_latest_allowed: list[Any] = [0.0, EARLIEST_OCCURRED_AT]


def _not_far_ahead(
    value: datetime, _monotonic: Callable[[], float] = time.monotonic, _latest: list[Any] = _latest_allowed
) -> datetime:
    # The only rule of an event checked in Python: the one bound that moves with the clock. The earliest
    # moment is the compiled validator's own `ge`, which compares before anything converts the value
    # (0001-01-01T00:30+01:00 is a valid ISO date whose UTC form does not exist: converting it is what
    # used to break the ledger's COPY). Two Python comparisons here were 40 % of an event's validation.
    if _monotonic() >= _latest[0]:
        _latest[0], _latest[1] = _monotonic() + 1.0, utc_now() + MAX_FUTURE
    if value > _latest[1]:
        raise ValueError(f"must not be more than {MAX_FUTURE.total_seconds():.0f} s in the future")
    return value


OccurredAt = Annotated[AwareDatetime, Field(ge=EARLIEST_OCCURRED_AT), AfterValidator(_not_far_ahead)]


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


class Ending(StrEnum):
    """How a call ended (DESIGN "The call lifecycle"); the policy still bills by `status`."""

    COMPLETED = "completed"  # succeeded: the provider answered in full
    PROVIDER_ERROR = "provider_error"  # failed: the provider refused or failed the call
    TIMEOUT = "timeout"  # failed: the provider did not answer (or finish) in time
    STOPPED = "stopped"  # by the user or the client going away: failed before the first token, succeeded after
    INTERRUPTED = "interrupted"  # failed: the instance running the call went away (its lease lapsed)
    NOT_STARTED = "not_started"  # failed: the provider was never asked (published only to settle a hold)


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
    def from_json(cls, raw: bytes | str) -> Self:
        # JSON has no UUID/datetime/enum types, so strict mode accepts their string forms
        # when parsing JSON (and still refuses e.g. "12" for an int).
        # The compiled validator itself: model_validate_json adds only keyword handling around it,
        # which is a third of the cost per event on the credit service's hot path.
        event: Self = cls.__pydantic_validator__.validate_json(raw)
        return event

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class ModelCallCompleted(Contract):
    """One finished model call, as published by the emitter (chat service or any other)."""

    event_id: UUID
    schema_version: Literal[1] = 1
    occurred_at: OccurredAt
    user_id: Identifier
    session_id: Identifier
    request_id: Identifier
    provider: Provider
    model: ModelId
    feature: Feature
    key_source: KeySource
    status: CallStatus
    input_tokens: TokenCount
    output_tokens: TokenCount
    latency_ms: LatencyMs
    # Added in the third round (optional: older emitters omit it, older consumers ignore it).
    ending: Ending | None = None


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
