"""Sessions that end on the server (issue 21): a saved copy of the session cookie, or a token, opens
nothing after Sign out; "sign out everywhere" ends every sign-in; the cookie's short-lived token is
renewed while the page is open. Real chat and credit processes on the real broker and database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from services.shared.auth import Identity
from services.shared.sessions import SessionRevocations
from tests.conftest import Stack
from tests.e2e.test_chat_flow import ChatSystem, start_system

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def system(stack: Stack, tmp_path: Path) -> Iterator[ChatSystem]:
    yield from start_system(
        stack.kafka_bootstrap,
        stack.database_url,
        stack.database_schema,
        stack.topic_prefix,
        tmp_path / "logs",
        with_validation=False,
        SESSION_RENEW_AFTER_S="1",
    )


def signed_in(system: ChatSystem, user: str) -> httpx.Client:
    web = httpx.Client(base_url=system.chat.url, timeout=30)
    assert web.post("/auth/dev-login", json={"user_id": user}).status_code == 200
    return web


def test_a_saved_session_cookie_opens_nothing_after_sign_out(system: ChatSystem):
    web = signed_in(system, "leaving")
    saved = dict(web.cookies)
    assert web.get("/api/me").status_code == 200
    assert web.post("/chat", json={"feature": "code_fix", "message": "fix"}).status_code == 200
    system.wait_balance("leaving", 49)
    assert web.post("/auth/logout").json()["signed_out"] is True
    thief = httpx.Client(base_url=system.chat.url, cookies=saved, timeout=30)
    me = thief.get("/api/me")
    assert me.status_code == 401 and "signed out" in me.json()["detail"]
    assert thief.post("/chat", json={"feature": "code_fix", "message": "on a stolen cookie"}).status_code == 401
    assert thief.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []}).status_code == 401
    time.sleep(1.5)
    assert system.balance("leaving") == 49  # nothing was charged on the saved cookie


def test_sign_out_everywhere_ends_every_sign_in_and_token_issued_before_it(system: ChatSystem):
    first, second = signed_in(system, "everywhere"), signed_in(system, "everywhere")
    api = system.client("everywhere")  # a bearer token, as API clients hold
    assert api.get("/api/me").status_code == 200 and second.get("/api/me").status_code == 200
    assert first.post("/auth/logout-everywhere").json()["everywhere"] is True
    assert second.get("/api/me").status_code == 401  # the other tab
    assert api.get("/api/me").status_code == 401  # the token minted before
    time.sleep(1.1)  # a token issued afterwards (a new sign-in) works
    assert signed_in(system, "everywhere").get("/api/me").status_code == 200


def test_the_cookies_short_token_is_renewed_while_the_page_is_open_and_keeps_its_session(system: ChatSystem):
    web = signed_in(system, "staying")
    before = web.cookies["byok_session"]
    time.sleep(1.2)
    r = web.get("/api/me")
    assert r.status_code == 200 and "byok_session" in r.cookies  # renewed
    after = web.cookies["byok_session"]
    assert after != before
    # The renewal is the same sign-in: signing out with the new token ends the old one too.
    assert web.post("/auth/logout").status_code == 200
    old = httpx.Client(base_url=system.chat.url, cookies={"byok_session": before}, timeout=30)
    assert old.get("/api/me").status_code == 401


def test_a_sign_out_on_one_instance_is_seen_by_another_within_a_second(stack: Stack):
    async def run() -> None:
        pools = [
            await asyncpg.create_pool(stack.database_url, server_settings={"search_path": stack.database_schema})
            for _ in range(2)
        ]
        from services.shared.db import migrate

        await migrate(stack.database_url, stack.database_schema)
        here, there = (SessionRevocations(p, refresh_s=0.2) for p in pools)
        await here.start()
        await there.start()
        try:
            who = Identity("u", session_id="sid-1", issued_at=time.time())
            assert not here.is_revoked(who) and not there.is_revoked(who)
            await here.revoke(who)
            assert here.is_revoked(who)  # at once where it was made
            deadline = time.monotonic() + 2
            while not there.is_revoked(who) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert there.is_revoked(who)
            other = Identity("u", session_id="sid-2", issued_at=time.time() - 10)
            await there.revoke_everywhere("u")
            deadline = time.monotonic() + 2
            while not here.is_revoked(other) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert here.is_revoked(other) and there.is_revoked(other)
            assert not here.is_revoked(Identity("u", session_id="sid-3", issued_at=time.time() + 5))
        finally:
            await here.stop()
            await there.stop()
            for p in pools:
                await p.close()

    asyncio.run(run())


def test_a_signed_out_token_opens_nothing_at_the_credit_service_either(system: ChatSystem):
    api = system.client("direct")  # a bearer token, as the chat and API clients send it
    headers = dict(api.headers)
    credits = f"{system.credits.url}/api/credits/direct"
    assert httpx.get(credits, headers=headers).status_code in (200, 404)
    assert api.post("/auth/logout").status_code == 200
    deadline = time.monotonic() + 3  # the credit service reads sign-outs every second
    while (r := httpx.get(credits, headers=headers)).status_code != 401 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 401 and "signed out" in r.text
