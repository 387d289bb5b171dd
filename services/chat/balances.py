"""The user's credits as the credit service keeps them: read the balance, reserve a call's price.

Every billable call is admitted by an admission hold placed in the credit service's database
(DESIGN.md "Admission holds"), asked over HTTP with the user's own token. The hold is checked and
placed atomically there, so no number of concurrent calls or chat instances can overspend; the
ledger settles it when the call's event is decided.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from uuid import UUID

import httpx

from schemas.events import Feature, Provider
from services.chat.identity import Identity

log = logging.getLogger(__name__)


class CreditsUnavailable(Exception):
    """The credit service could not answer (down, slow, or refused our token)."""


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


class BalanceReader:
    """Port: the calling user's credits at the credit service."""

    async def funds(self, who: Identity) -> Funds:
        raise NotImplementedError

    async def balance(self, who: Identity) -> int:
        return (await self.funds(who)).available

    async def reserve(
        self, who: Identity, event_id: UUID, feature: Feature, provider: Provider, model: str
    ) -> Reservation:
        """Place the admission hold of one billable call; raises HoldRefused or CreditsUnavailable."""
        raise NotImplementedError

    async def release(self, who: Identity, event_id: UUID) -> None:
        """Release the hold of a call that never reached the provider (best effort: holds also expire)."""
        raise NotImplementedError


class HttpBalanceReader(BalanceReader):
    def __init__(self, client: httpx.AsyncClient, credits_url: str):
        self.client, self.credits_url = client, credits_url.rstrip("/")

    @staticmethod
    def _auth(who: Identity) -> dict[str, str]:
        return {"Authorization": f"Bearer {who.token}"}

    async def funds(self, who: Identity) -> Funds:
        try:
            response = await self.client.get(f"{self.credits_url}/api/credits/{who.user_id}", headers=self._auth(who))
        except httpx.HTTPError as exc:
            raise CreditsUnavailable(f"the credit service did not answer ({type(exc).__name__})") from None
        if response.status_code == 404:
            return Funds(0)  # no account yet: nothing granted
        if response.status_code != 200:
            raise CreditsUnavailable(f"the credit service answered HTTP {response.status_code}")
        try:
            body = response.json()
            return Funds(int(body["balance"]), int(body.get("held", 0)))
        except (ValueError, KeyError, TypeError):
            raise CreditsUnavailable("the credit service sent an unreadable balance") from None

    async def reserve(
        self, who: Identity, event_id: UUID, feature: Feature, provider: Provider, model: str
    ) -> Reservation:
        body = {"event_id": str(event_id), "feature": feature.value, "provider": provider.value, "model": model}
        try:
            response = await self.client.post(f"{self.credits_url}/api/holds", json=body, headers=self._auth(who))
        except httpx.HTTPError as exc:
            raise CreditsUnavailable(f"the credit service did not answer ({type(exc).__name__})") from None
        try:
            answer = response.json()
            if response.status_code in (200, 201):
                return Reservation(event_id, int(answer["credits"]), int(answer["available"]))
            if response.status_code == 402:
                raise HoldRefused(int(answer["needed"]), int(answer["available"]), int(answer.get("held", 0)))
        except (ValueError, KeyError, TypeError):
            raise CreditsUnavailable("the credit service sent an unreadable answer") from None
        raise CreditsUnavailable(
            f"the credit service refused the hold (HTTP {response.status_code}: {str(answer.get('detail', ''))[:200]})"
        )

    async def release(self, who: Identity, event_id: UUID) -> None:
        try:
            response = await self.client.delete(f"{self.credits_url}/api/holds/{event_id}", headers=self._auth(who))
        except httpx.HTTPError as exc:
            log.warning("hold %s not released (%s); it expires on its own", event_id, type(exc).__name__)
            return
        if response.status_code not in (200, 404):
            log.warning("hold %s not released (HTTP %d); it expires on its own", event_id, response.status_code)
