"""One user action, one call: the `Idempotency-Key` a call is known by, and what it derives."""

from __future__ import annotations

import re
import uuid

from services.chat.refusals import InvalidRequest

# Printable ASCII without spaces, as HTTP header values and Stripe's keys are.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")
_EVENT_IDS = uuid.UUID("5f0e8f4e-2b7c-4f43-9a51-0c4f6a7d1e21")  # the namespace of derived event ids


class IdempotencyKeyReused(InvalidRequest):
    code = "idempotency_key_reused"


def call_event_id(user_id: str, key: str) -> uuid.UUID:
    """The event id of the user's call with `key`: the same on every instance and every retry."""
    return uuid.uuid5(_EVENT_IDS, f"{user_id}\n{key}")


def checked_key(key: str | None) -> str:
    """The client's `Idempotency-Key`, or a fresh one (a call nobody can retry) when it sent none."""
    if key is None:
        return f"auto-{uuid.uuid4().hex}"
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequest(
            "The Idempotency-Key header is 1 to 200 printable characters without spaces (for example a UUID).",
            reason="invalid_idempotency_key",
        )
    return key
