"""The compatibility route `POST /api/user/deduct-credits` holds before it records (issue 21 item 3):
on the real broker, consumer, relay and ledger, no sequence of calls takes a balance below zero."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.credits.bootstrap import running
from services.credits.settings import CreditSettings
from services.shared.auth import mint_token

pytestmark = pytest.mark.integration

SECRET = "compat-test-secret-0123456789abcdef"


def auth(user: str, role: str = "user") -> dict:
    return {"Authorization": f"Bearer {mint_token(SECRET, user, role)}"}


@pytest.fixture
async def api(stack):
    settings = stack.settings(CreditSettings, auth_jwt_secret=SECRET, relay_mode="task")
    async with running(settings) as runtime:
        transport = httpx.ASGITransport(app=runtime.api())
        async with httpx.AsyncClient(transport=transport, base_url="http://credits", timeout=30) as client:
            yield client


async def grant(api, user: str, key: str = "signup") -> None:
    body = {"grant_key": f"{key}:{user}", "user_id": user, "plan": "free"}  # 50 credits
    assert (await api.post("/api/admin/grants", headers=auth("ops", "admin"), json=body)).status_code == 201


async def credits_of(api, user: str) -> dict:
    return (await api.get(f"/api/credits/{user}", headers=auth(user))).json()


def deep(key: str, key_source: str = "platform") -> dict:
    return {"feature": "deep_analysis", "model": "gpt-4o", "key_source": key_source, "idempotency_key": key}


async def test_two_concurrent_deep_analyses_on_fifty_credits_one_is_paid_one_is_refused(api):
    await grant(api, "ann")
    first, second = await asyncio.gather(
        api.post("/api/user/deduct-credits", headers=auth("ann"), json=deep("a-1")),
        api.post("/api/user/deduct-credits", headers=auth("ann"), json=deep("a-2", "byok")),
    )
    answers = sorted([first, second], key=lambda r: r.status_code)
    assert [r.status_code for r in answers] == [200, 402], [r.text for r in answers]
    paid, refused = answers
    assert (paid.json()["decision"], paid.json()["credits"], paid.json()["balance"]) == ("debited", 50, 0)
    body = refused.json()
    assert (body["error"], body["needed"], body["available"]) == ("insufficient_credits", 50, 0)
    assert "costs 50 credits" in body["message"]
    account = await credits_of(api, "ann")
    assert (account["balance"], account["held"], account["available"]) == (0, 0, 0)


async def test_many_concurrent_calls_never_take_the_balance_below_zero(api):
    await grant(api, "bea")
    answers = await asyncio.gather(
        *[api.post("/api/user/deduct-credits", headers=auth("bea"), json=deep(f"b-{i}")) for i in range(8)],
        *[
            api.post(
                "/api/user/deduct-credits",
                headers=auth("bea"),
                json={"feature": "chat", "model": "gpt-4o", "key_source": "platform", "idempotency_key": f"c-{i}"},
            )
            for i in range(8)
        ],
    )
    assert {r.status_code for r in answers} <= {200, 402}, [r.text for r in answers]
    debited = sum(r.json()["credits"] for r in answers if r.status_code == 200)
    account = await credits_of(api, "bea")
    assert account["balance"] == 50 - debited >= 0 and account["held"] == 0
    assert any(r.status_code == 402 for r in answers)


async def test_a_byok_chat_is_not_charged_and_needs_no_credits(api):
    body = {"feature": "chat", "model": "claude-3-5-haiku", "key_source": "byok", "idempotency_key": "k-1"}
    r = await api.post("/api/user/deduct-credits", headers=auth("cid"), json=body)  # no grant at all
    assert r.status_code == 200, r.text
    assert (r.json()["decision"], r.json()["credits"], r.json()["balance"]) == ("not_billed_byok", 0, 0)


async def test_the_same_key_is_the_same_call_and_a_refused_call_can_be_sent_again(api):
    await grant(api, "dan")
    first = await api.post("/api/user/deduct-credits", headers=auth("dan"), json=deep("d-1"))
    again = await api.post("/api/user/deduct-credits", headers=auth("dan"), json=deep("d-1"))
    assert first.status_code == again.status_code == 200
    assert again.json()["event_id"] == first.json()["event_id"] and again.json()["balance"] == 0
    other = await api.post("/api/user/deduct-credits", headers=auth("dan"), json=deep("d-1") | {"model": "gpt-4o-mini"})
    assert other.status_code == 409 and "already used for a different call" in other.json()["detail"]
    refused = await api.post("/api/user/deduct-credits", headers=auth("dan"), json=deep("d-2"))
    assert refused.status_code == 402  # nothing held, nothing recorded: the key is still free
    await grant(api, "dan", key="top-up")
    paid = await api.post("/api/user/deduct-credits", headers=auth("dan"), json=deep("d-2"))
    assert (paid.status_code, paid.json()["decision"], paid.json()["balance"]) == (200, "debited", 0)


async def test_an_unpriced_model_on_platform_credits_is_refused_before_anything_is_held(api):
    await grant(api, "eve")
    body = {"feature": "chat", "model": "gpt-0-unpriced", "key_source": "platform", "idempotency_key": "e-1"}
    r = await api.post("/api/user/deduct-credits", headers=auth("eve"), json=body | {"provider": "openai"})
    assert r.status_code == 422 and "gpt-0-unpriced" in r.json()["detail"], r.text
    assert (await credits_of(api, "eve"))["held"] == 0
