"""The user's credits as the credit service keeps them: read the balance, reserve a call's price.

Every billable call is admitted by an admission hold placed in the credit service's database
(DESIGN.md "Admission holds"), asked over HTTP with the user's own token. The hold is checked and
placed atomically there, so no number of concurrent calls or chat instances can overspend; the
ledger settles it when the call's event is decided.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from schemas.events import Feature, Provider
from services.chat.credits_client import Answer, CreditsClient, CreditsUnreachable
from services.chat.identity import Identity

log = logging.getLogger(__name__)


class CreditsUnavailable(Exception):
    """The credit service could not answer (down, slow, or refused our token)."""


class HoldConflict(Exception):
    """The credit service will not hold this event id: it is already decided (a key used again)."""


class HoldRefused(Exception):
    """Not enough available credits for the call; nothing is held."""

    def __init__(self, needed: int, available: int, held: int = 0):
        super().__init__(f"needs {needed}, {available} available")
        self.needed, self.available, self.held = needed, available, held


@dataclass(frozen=True)
class Funds:
    balance: int
    held: int = 0

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(frozen=True)
class Reservation:
    event_id: UUID
    credits: int
    available: int  # after this hold


class CreditAccount:
    """Port: the calling user's credits at the credit service."""

    async def funds(self, who: Identity) -> Funds:
        raise NotImplementedError

    async def reserve(
        self, who: Identity, event_id: UUID, feature: Feature, provider: Provider, model: str
    ) -> Reservation:
        """Place the admission hold of one billable call; raises HoldRefused or CreditsUnavailable."""
        raise NotImplementedError

    async def release(self, who: Identity, event_id: UUID) -> None:
        """Release the hold of a call that never reached the provider (best effort: the call's event, decided,
        releases it too)."""
        raise NotImplementedError


class HttpCreditAccount(CreditAccount):
    """The credit service's routes, with the user's own token (`services.chat.credits_client`)."""

    def __init__(self, client: CreditsClient):
        self.client = client

    async def _ask(self, method: str, path: str, who: Identity, body: dict[str, Any] | None = None) -> Answer:
        try:
            return await self.client.request(method, path, who.token, json_body=body)
        except CreditsUnreachable as exc:
            raise CreditsUnavailable(str(exc)) from None

    async def funds(self, who: Identity) -> Funds:
        answer = await self._ask("GET", f"/api/credits/{who.user_id}", who)
        if answer.status == 404:
            return Funds(0)  # no account yet: nothing granted
        if answer.status != 200:
            raise CreditsUnavailable(f"the credit service answered HTTP {answer.status}")
        try:
            return Funds(int(answer.body["balance"]), int(answer.body.get("held", 0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CreditsUnavailable("the credit service sent an unreadable balance") from None

    async def reserve(
        self, who: Identity, event_id: UUID, feature: Feature, provider: Provider, model: str
    ) -> Reservation:
        body = {"event_id": str(event_id), "feature": feature.value, "provider": provider.value, "model": model}
        answer = await self._ask("POST", "/api/holds", who, body)
        found = answer.body if isinstance(answer.body, dict) else {}
        try:
            if answer.status in (200, 201):
                return Reservation(event_id, int(found["credits"]), int(found["available"]))
            if answer.status == 409:
                raise HoldConflict(str(found.get("detail", ""))[:200])
            if answer.status == 402:
                raise HoldRefused(int(found["needed"]), int(found["available"]), int(found.get("held", 0)))
        except (ValueError, KeyError, TypeError):
            raise CreditsUnavailable("the credit service sent an unreadable answer") from None
        raise CreditsUnavailable(
            f"the credit service refused the hold (HTTP {answer.status}: {str(found.get('detail', ''))[:200]})"
        )

    async def release(self, who: Identity, event_id: UUID) -> None:
        try:
            answer = await self._ask("DELETE", f"/api/holds/{event_id}", who)
        except CreditsUnavailable as exc:
            log.warning("hold %s not released (%s); its event's decision releases it", event_id, exc)
            return
        if answer.status not in (200, 404):
            log.warning("hold %s not released (HTTP %d); its event's decision releases it", event_id, answer.status)
