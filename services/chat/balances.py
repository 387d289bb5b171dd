"""The user's balance, asked of the credit service over HTTP with the user's own token."""

from __future__ import annotations

import asyncio
import time

import httpx

from services.chat.identity import Identity


class CreditsUnavailable(Exception):
    """The credit service could not say the balance (down, slow, or refused our token)."""


class BalanceReader:
    """Port: the balance of the calling user."""

    async def balance(self, who: Identity) -> int:
        raise NotImplementedError

    def note_charge(self, user_id: str, credits: int) -> None:
        """A call just cost `credits` (the credit service will debit it shortly)."""


class RecentBalances(BalanceReader):
    """Reuses a balance read less than `max_age_s` ago, minus what calls cost since.

    The pre-call check is a guard, not the ledger: the balance it reads is already behind by the
    debits still on their way through Kafka, so a second-old reading less this instance's own charges
    is no less accurate, and it saves a credit-service round trip on most calls. Grants show up once
    the reading is older than `max_age_s`.
    """

    def __init__(self, inner: BalanceReader, max_age_s: float = 1.0, clock=time.monotonic):
        self.inner, self.max_age_s, self.clock = inner, max_age_s, clock
        self._seen: dict[str, tuple[float, int]] = {}  # user -> (read at, balance less charges since)
        # One read per user at a time: calls that find the reading stale while it is being renewed
        # wait for that read instead of each asking the credit service again.
        self._reading: dict[str, asyncio.Future[int]] = {}

    async def balance(self, who: Identity) -> int:
        seen = self._seen.get(who.user_id)
        if seen is not None and self.clock() - seen[0] < self.max_age_s:
            return seen[1]
        reading = self._reading.get(who.user_id)
        if reading is None:
            reading = asyncio.ensure_future(self._read(who))
            self._reading[who.user_id] = reading
            reading.add_done_callback(lambda _: self._reading.pop(who.user_id, None))
        # Shielded: a caller that gives up does not cancel the read the others wait for.
        return await asyncio.shield(reading)

    async def _read(self, who: Identity) -> int:
        now = self.clock()
        value = await self.inner.balance(who)
        if len(self._seen) > 100_000:
            self._seen.clear()
        self._seen[who.user_id] = (now, value)
        return value

    def note_charge(self, user_id: str, credits: int) -> None:
        seen = self._seen.get(user_id)
        if seen is not None:
            self._seen[user_id] = (seen[0], seen[1] - credits)


class HttpBalanceReader(BalanceReader):
    def __init__(self, client: httpx.AsyncClient, credits_url: str):
        self.client, self.credits_url = client, credits_url.rstrip("/")

    async def balance(self, who: Identity) -> int:
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

    async def balance(self, who: Identity) -> int:
        return self.balances.get(who.user_id, 0)
