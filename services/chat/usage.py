"""The user's usage history, read from the credit service's ledger with the user's own token."""

from __future__ import annotations

from typing import Any

from services.chat.credits_client import CreditsClient, CreditsUnreachable
from services.chat.identity import Identity


class UsageUnavailable(Exception):
    """The credit service could not say the usage (down, slow, or refused our token)."""


class UsageReader:
    """Port: the calling user's last calls as the ledger decided them, and their latest grant."""

    async def usage(self, who: Identity, limit: int = 50) -> dict[str, Any]:
        raise NotImplementedError


class HttpUsageReader(UsageReader):
    def __init__(self, client: CreditsClient):
        self.client = client

    async def usage(self, who: Identity, limit: int = 50) -> dict[str, Any]:
        try:
            answer = await self.client.request("GET", f"/api/usage/{who.user_id}", who.token, params={"limit": limit})
        except CreditsUnreachable as exc:
            raise UsageUnavailable(str(exc)) from None
        if answer.status != 200:
            raise UsageUnavailable(f"the credit service answered HTTP {answer.status}")
        try:
            return {"calls": list(answer.body["calls"]), "last_grant": answer.body.get("last_grant")}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageUnavailable("the credit service sent an unreadable usage list") from None
