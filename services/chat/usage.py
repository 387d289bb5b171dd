"""The user's usage history, read from the credit service's ledger with the user's own token."""

from __future__ import annotations

import httpx

from services.chat.identity import Identity


class UsageUnavailable(Exception):
    """The credit service could not say the usage (down, slow, or refused our token)."""


class UsageReader:
    """Port: the calling user's last calls as the ledger decided them, and their latest grant."""

    async def usage(self, who: Identity, limit: int = 50) -> dict:
        raise NotImplementedError


class HttpUsageReader(UsageReader):
    def __init__(self, client: httpx.AsyncClient, credits_url: str):
        self.client, self.credits_url = client, credits_url.rstrip("/")

    async def usage(self, who: Identity, limit: int = 50) -> dict:
        try:
            response = await self.client.get(
                f"{self.credits_url}/api/usage/{who.user_id}",
                params={"limit": limit},
                headers={"Authorization": f"Bearer {who.token}"},
            )
        except httpx.HTTPError as exc:
            raise UsageUnavailable(f"the credit service did not answer ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise UsageUnavailable(f"the credit service answered HTTP {response.status_code}")
        try:
            body = response.json()
            return {"calls": list(body["calls"]), "last_grant": body.get("last_grant")}
        except (ValueError, KeyError, TypeError):
            raise UsageUnavailable("the credit service sent an unreadable usage list") from None
