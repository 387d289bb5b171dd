"""What the ledger records of one decided event: its row, its identity, and what a batch's write did.

The event id is the ledger entry's primary key, so an event redelivered, duplicated or replayed is
decided once; IDENTITY_FIELDS tell a redelivery (the same call) from a conflict (another call under a
decided id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from billing.policy import Charge
from schemas.events import ModelCallCompleted

# One ledger row in LEDGER_COLUMNS order, and the identity of an event (or of a decided row) in
# IDENTITY_FIELDS order: tuples of mixed types, compared and copied as they are.
LedgerRow = tuple[object, ...]
IdentityValues = tuple[object, ...]

LEDGER_COLUMNS = (
    "entry_id",
    "event_id",
    "kind",
    "user_id",
    "decision",
    "credits",
    "price_list_version",
    "reason",
    "provider",
    "model",
    "feature",
    "key_source",
    "status",
    "occurred_at",
    "balance_after",
)


class Decided(NamedTuple):
    """An event and what the policy says it owes; `raw` is kept to dead-letter a rejected event.

    A tuple rather than a frozen dataclass: one is built per event, and a frozen dataclass's
    __init__ costs several times as much.
    """

    event: ModelCallCompleted
    charge: Charge
    raw: bytes | None = None
    source_topic: str = ""
    source_partition: int = -1
    source_offset: int = -1


def decision_row(e: ModelCallCompleted, c: Charge, balance_after: int) -> LedgerRow:
    """The ledger row of one decided event, in LEDGER_COLUMNS order (the COPY layout).

    The enums are str subclasses: passed as they are, they are written as their values.
    """
    return (
        e.event_id,
        e.event_id,
        "decision",
        e.user_id,
        c.decision,
        c.credits,
        c.price_list_version,
        c.reason,
        e.provider,
        e.model,
        e.feature,
        e.key_source,
        e.status,
        e.occurred_at,
        balance_after,
    )


# What makes two events with one id the same call (DESIGN.md "Same id, other content"): whose account,
# what ran, on whose key, and whether it succeeded, i.e. everything the policy charges by and whom it
# charges. An event re-sent with the same identity is a duplicate even if its occurred_at, latency,
# tokens, session/request ids or ending differ (a retry re-stamps those; the policy does not charge by
# them); one with another identity is a conflict: the first decision stands, the other goes to the DLQ.
IDENTITY_FIELDS = ("user_id", "feature", "model", "key_source", "provider", "status")
CONFLICT = "conflict"  # the dead letters' dlq.error_type


def identity(event: ModelCallCompleted) -> IdentityValues:
    """The event's IDENTITY_FIELDS, in order (enums as they are: a member equals its stored value)."""
    return (event.user_id, event.feature, event.model, event.key_source, event.provider, event.status)


def conflicting(prior: IdentityValues | ModelCallCompleted | None, event: ModelCallCompleted) -> str:
    """'' when `event` is the same call as `prior`, else what differs.

    `prior` is an earlier event of the batch, or the identity of its ledger row (None for an entry that
    is not a decision: its id is not an event's). A ledger field that is NULL (a row written without
    it, e.g. by hand) is not held against the event.
    """
    if prior is None:
        return ""
    before = identity(prior) if isinstance(prior, ModelCallCompleted) else prior
    now = identity(event)
    if before == now:  # the usual redelivery: one tuple comparison
        return ""
    return ", ".join(
        f"{name} {b!s} (decided) vs {n!s}"
        for name, b, n in zip(IDENTITY_FIELDS, before, now, strict=True)
        if b is not None and b != n
    )


@dataclass(frozen=True)
class Recorded:
    """What one `Ledger.record` wrote: new decisions, redeliveries ignored, debits, rejections, conflicts."""

    new: int
    duplicates: int
    debited: int
    credits: int
    rejected: int
    conflicts: int = 0  # same event id, another identity: dead-lettered as `conflict`
