"""The user's balance, asked of the credit service over HTTP with the user's own token."""

from __future__ import annotations

import httpx

from services.chat.identity import Principal


class CreditsUnavailable(Exception):
    """The credit service could not say the balance (down, slow, or refused our token)."""


class BalanceReader:
    """Port: the balance of the calling user."""

    async def balance(self, who: Principal) -> int:
        raise NotImplementedError


class HttpBalanceReader(BalanceReader):
    def __init__(self, client: httpx.AsyncClient, credits_url: str):
        self.client, self.credits_url = client, credits_url.rstrip("/")

    async def balance(self, who: Principal) -> int:
        try:
            response = await self.client.get(
                f"{self.credits_url}/api/credits/{who.user_id}",
                headers={"Authorization": f"Bearer {who.token}"},
            )
        except httpx.HTTPError as exc:
            raise CreditsUnavailable(f"the credit service did not answer ({type(exc).__name__})") from None
        if response.status_code == 404:
            return 0  # no account yet: nothing granted
        if response.status_code != 200:
            raise CreditsUnavailable(f"the credit service answered HTTP {response.status_code}")
        try:
            return int(response.json()["balance"])
        except (ValueError, KeyError, TypeError):
            raise CreditsUnavailable("the credit service sent an unreadable balance") from None


class FixedBalances(BalanceReader):
    """For unit tests: balances from a dict."""

    def __init__(self, balances: dict[str, int] | None = None):
        self.balances = balances or {}

    async def balance(self, who: Principal) -> int:
        return self.balances.get(who.user_id, 0)
