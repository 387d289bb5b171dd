"""The credit service's HTTP API against the real ledger (and, for the compatibility route, the real
broker and consumer)."""

import httpx
import pytest

from services.credits.bootstrap import running
from services.credits.settings import CreditSettings
from services.shared.auth import mint_token

pytestmark = pytest.mark.integration

SECRET = "test-secret-of-at-least-32-bytes!!"


@pytest.fixture
async def api(stack):
    async with running(stack.settings(CreditSettings, auth_jwt_secret=SECRET)) as runtime:
        transport = httpx.ASGITransport(app=runtime.api())
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
            yield client


def auth(user: str, role: str = "user") -> dict:
    return {"Authorization": f"Bearer {mint_token(SECRET, user, role)}"}


async def grant(api, user, plan="free", key=None):
    return await api.post(
        "/api/admin/grants",
        headers=auth("ops", "admin"),
        json={"grant_key": key or f"signup:{user}", "user_id": user, "plan": plan},
    )


async def test_a_grant_is_idempotent_by_its_key_and_uses_the_plan_amount(api):
    first = await grant(api, "alice", "standard")
    assert first.status_code == 201 and first.json()["credits"] == 500
    again = await grant(api, "alice", "standard")
    assert again.status_code == 200 and again.json()["created"] is False
    assert (await api.get("/api/credits/alice", headers=auth("alice"))).json()["balance"] == 500
    clash = await grant(api, "alice", "free")
    assert clash.status_code == 409 and "already used" in clash.json()["detail"]
    assert (await grant(api, "alice", "platinum", key="other")).status_code == 422


async def test_only_an_admin_grants_and_a_user_sees_only_their_own_balance(api):
    refused = await api.post(
        "/api/admin/grants", headers=auth("alice"), json={"grant_key": "g", "user_id": "alice", "plan": "standard"}
    )
    assert refused.status_code == 403
    await grant(api, "bob")
    assert (await api.get("/api/credits/bob", headers=auth("alice"))).status_code == 403
    assert (await api.get("/api/credits/bob", headers=auth("ops", "admin"))).json()["balance"] == 50
    assert (await api.get("/api/credits/bob")).status_code == 401
    forged = {"Authorization": f"Bearer {mint_token('another-secret-32-bytes-long!!!!', 'bob')}"}
    assert (await api.get("/api/credits/bob", headers=forged)).status_code == 401


async def test_the_compatibility_route_applies_the_policy_once_per_idempotency_key(api):
    await grant(api, "dora")
    body = {"feature": "chat", "model": "gpt-4o", "key_source": "platform", "idempotency_key": "req-1"}
    first = await api.post("/api/user/deduct-credits", headers=auth("dora"), json=body)
    assert first.status_code == 200, first.text
    assert (first.json()["decision"], first.json()["credits"], first.json()["balance"]) == ("debited", 5, 45)
    again = await api.post("/api/user/deduct-credits", headers=auth("dora"), json=body)
    assert again.json()["event_id"] == first.json()["event_id"] and again.json()["balance"] == 45

    byok = await api.post(
        "/api/user/deduct-credits", headers=auth("dora"), json=body | {"key_source": "byok", "idempotency_key": "req-2"}
    )
    assert (byok.json()["decision"], byok.json()["credits"], byok.json()["balance"]) == ("not_billed_byok", 0, 45)
    deep = body | {"feature": "deep_analysis", "key_source": "byok", "idempotency_key": "req-3"}
    short = await api.post("/api/user/deduct-credits", headers=auth("dora"), json=deep)  # 50 on 45: refused
    assert short.status_code == 402, short.text
    assert (short.json()["needed"], short.json()["available"]) == (50, 45)
    await grant(api, "dora", key="top-up")
    paid = await api.post("/api/user/deduct-credits", headers=auth("dora"), json=deep)
    assert (paid.json()["decision"], paid.json()["credits"], paid.json()["balance"]) == ("debited", 50, 45)


async def test_the_compatibility_route_never_takes_an_amount_from_the_client(api):
    body = {"feature": "chat", "model": "gpt-4o", "key_source": "platform", "idempotency_key": "x", "amount": 0}
    refused = await api.post("/api/user/deduct-credits", headers=auth("erin"), json=body)
    assert refused.status_code == 422
    unknown = await api.post(
        "/api/user/deduct-credits",
        headers=auth("erin"),
        json={"feature": "chat", "model": "mystery", "key_source": "platform", "idempotency_key": "y"},
    )
    assert unknown.status_code == 422 and "provider" in unknown.text


async def test_health_and_metrics(api):
    assert (await api.get("/healthz")).json()["status"] == "ok"
    text = (await api.get("/metrics")).text
    for name in ("credits_events_consumed_total", "credits_debits_total", "credits_dlq_total", "credits_consumer_lag"):
        assert name in text


async def test_usage_lists_a_users_own_decided_calls_newest_first_with_their_last_grant(api):
    assert (await api.get("/api/usage/fay", headers=auth("fay"))).json() == {
        "user_id": "fay",
        "calls": [],
        "last_grant": None,
    }
    await grant(api, "fay")
    body = {"feature": "chat", "model": "gpt-4o", "key_source": "platform", "idempotency_key": "u-1"}
    assert (await api.post("/api/user/deduct-credits", headers=auth("fay"), json=body)).status_code == 200
    body |= {"key_source": "byok", "model": "claude-3-5-haiku", "idempotency_key": "u-2"}
    assert (await api.post("/api/user/deduct-credits", headers=auth("fay"), json=body)).status_code == 200
    usage = (await api.get("/api/usage/fay", headers=auth("fay"))).json()
    assert [
        (c["feature"], c["provider"], c["model"], c["key_source"], c["decision"], c["credits"]) for c in usage["calls"]
    ] == [
        ("chat", "anthropic", "claude-3-5-haiku", "byok", "not_billed_byok", 0),
        ("chat", "openai", "gpt-4o", "platform", "debited", 5),
    ]
    assert usage["calls"][0]["time"] and usage["last_grant"]["credits"] == 50 and usage["last_grant"]["plan"] == "free"
    assert len((await api.get("/api/usage/fay?limit=1", headers=auth("fay"))).json()["calls"]) == 1
    assert (await api.get("/api/usage/fay", headers=auth("gus"))).status_code == 403
    assert (await api.get("/api/usage/fay")).status_code == 401
    assert (await api.get("/api/usage/fay?limit=0", headers=auth("fay"))).status_code == 422
