"""What counts as a difference between the event log and the ledger, and what corrects it.

The unit of comparison is one (event, account): the credits the policy says the event owes that
account, against the net of every ledger entry for it (its decision plus any corrections). The
comparison is about money: an event is clean when the net equals what it owes, whatever the entries
look like (so a debit that was later refunded by a correction is clean, and so is a missing debit
that a correction supplied). Every (event, account) that is not clean gets exactly one kind:

- missing_debit: the event owes credits and the ledger's net for it is zero (no debit, or a debit
  cancelled since).
- double_debit: the ledger holds more than one debit (a positive entry: the decision, a positive
  correction) for the event, and together they charge more than it owes. With one decision per
  event enforced by the database, this is a debit-like correction (or a re-recorded debit) on top of
  an event already debited.
- wrong_amount: the event owes credits, the ledger charged a different non-zero amount through a
  single debit (e.g. the wrong price list or tier); also any charge on an event the policy rejects
  (unpriced model), and a net refund on an event that owes nothing.
- byok_call_debited: a successful BYOK chat call (owes nothing) carries a charge.
- failed_call_debited: a failed call (owes nothing) carries a charge.
- debit_with_no_event: ledger entries of the window whose event is not in the log's window, with a
  non-zero net.
- debit_on_wrong_account: entries for an event of the window, on an account that is not the
  event's user (the event's own account then shows its own difference, usually a missing debit).
- unreadable_event: a record of the window that cannot be read as a `ModelCallCompleted`; what it
  owes is unknown, so it is reported for a person to look at and never repaired automatically.

Not a difference: not_yet_decided, an event with no ledger entry at all that lies at or beyond the
credit service's committed offset (group `credits`): the service may simply not have reached it.
It is listed apart, never counted in the exit code and never repaired (a correction written now
would double the debit the service is about to write).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from schemas.events import Decision

# Namespace of the deterministic ids of corrections (uuid5 of the event, account and generation).
CORRECTION_NAMESPACE = uuid.UUID("6f1c1f7e-3c56-5b8a-9d0e-2b1f0a4c7e11")


class Kind(StrEnum):
    MISSING_DEBIT = "missing_debit"
    DOUBLE_DEBIT = "double_debit"
    WRONG_AMOUNT = "wrong_amount"
    BYOK_CALL_DEBITED = "byok_call_debited"
    FAILED_CALL_DEBITED = "failed_call_debited"
    DEBIT_WITH_NO_EVENT = "debit_with_no_event"
    DEBIT_ON_WRONG_ACCOUNT = "debit_on_wrong_account"
    UNREADABLE_EVENT = "unreadable_event"
    NOT_YET_DECIDED = "not_yet_decided"


def classify(
    expected_decision: str | None,
    expected_credits: int | None,
    ledger_net: int,
    ledger_debits: int,
    *,
    event_in_window: bool = False,
) -> Kind | None:
    """The kind of difference of one (event, account), or None when it is clean.

    `expected_decision`/`expected_credits` are None when the account has no event of the window
    (ledger entries only); `event_in_window` then says whether the event exists for another account.
    """
    if expected_decision is None:
        if ledger_net == 0:
            return None
        return Kind.DEBIT_ON_WRONG_ACCOUNT if event_in_window else Kind.DEBIT_WITH_NO_EVENT
    owed = expected_credits or 0
    if ledger_net == owed:
        return None
    if owed == 0:
        if ledger_net > 0 and expected_decision == Decision.NOT_BILLED_FAILED:
            return Kind.FAILED_CALL_DEBITED
        if ledger_net > 0 and expected_decision == Decision.NOT_BILLED_BYOK:
            return Kind.BYOK_CALL_DEBITED
        return Kind.WRONG_AMOUNT
    if ledger_net == 0:
        return Kind.MISSING_DEBIT
    if ledger_net > owed and ledger_debits >= 2:
        return Kind.DOUBLE_DEBIT
    return Kind.WRONG_AMOUNT


@dataclass
class Difference:
    """One reported difference: what the event owes, what the ledger holds, and the fix."""

    kind: Kind
    event_id: UUID | None
    user_id: str | None
    occurred_at: datetime | None = None
    expected_decision: str | None = None
    expected_credits: int | None = None
    ledger_decision: str | None = None
    ledger_credits: int = 0
    ledger_entries: int = 0
    ledger_debits: int = 0
    ledger_corrections: int = 0
    price_list_version: str | None = None
    ledger_price_list_version: str | None = None
    provider: str | None = None
    model: str | None = None
    feature: str | None = None
    key_source: str | None = None
    status: str | None = None
    partition: int | None = None
    offset: int | None = None
    detail: str = ""
    extra: dict[str, object] = field(default_factory=dict, repr=False)

    @property
    def repairable(self) -> bool:
        return self.kind not in (Kind.UNREADABLE_EVENT, Kind.NOT_YET_DECIDED) and self.user_id is not None

    @property
    def correction_credits(self) -> int:
        """Credits a correction must carry to bring the ledger to what the event owes."""
        return (self.expected_credits or 0) - self.ledger_credits

    def as_row(self) -> dict[str, object]:
        row = asdict(self)
        row.pop("extra")
        row["kind"] = self.kind.value
        row["correction_credits"] = self.correction_credits if self.repairable else None
        return row


@dataclass(frozen=True)
class Correction:
    """A compensating ledger entry (kind 'correction'); never an edit of history."""

    entry_id: UUID
    event_id: UUID
    user_id: str
    credits: int
    reason: str
    price_list_version: str | None
    provider: str | None
    model: str | None
    feature: str | None
    key_source: str | None
    status: str | None
    occurred_at: datetime | None


def correction_id(event_id: UUID, user_id: str, generation: int) -> UUID:
    """Deterministic id: the same difference seen twice (a rerun, two concurrent runs) yields the
    same id, so only one correction lands; `generation` (the corrections already recorded for this
    event and account) makes a later, new difference on the same event get a new id."""
    return uuid.uuid5(CORRECTION_NAMESPACE, f"{event_id}/{user_id}/{generation}")


def correction_for(diff: Difference) -> Correction | None:
    # user_id: `repairable` requires one; said again so the type checker knows it too.
    if not diff.repairable or diff.correction_credits == 0 or diff.event_id is None or diff.user_id is None:
        return None
    owed = diff.expected_credits or 0
    return Correction(
        entry_id=correction_id(diff.event_id, diff.user_id, diff.ledger_corrections),
        event_id=diff.event_id,
        user_id=diff.user_id,
        credits=diff.correction_credits,
        reason=f"finance repair of {diff.kind.value}: the ledger held {diff.ledger_credits}, the event owes {owed}",
        price_list_version=diff.price_list_version or diff.ledger_price_list_version,
        provider=diff.provider,
        model=diff.model,
        feature=diff.feature,
        key_source=diff.key_source,
        status=diff.status,
        occurred_at=diff.occurred_at,
    )
