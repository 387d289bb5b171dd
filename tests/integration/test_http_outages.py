"""PostgreSQL unreachable: every route of chat and credits answers 503 with a JSON sentence, never a
bare 500. A PostgreSQL cluster of the test's own is stopped under the running services."""

from __future__ import annotations

import httpx
import pytest

from services.chat.app import create_app
from services.chat.bootstrap import wire
from services.chat.settings import ChatSettings
from services.credits.bootstrap import running
from services.credits.settings import CreditSettings
from services.shared.auth import mint_token
from tests.fakes import FakeChecker
from tests.support import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SECRET = "outage-test-secret-0123456789abcdef"
USER_KEY = "sk-proj-outageTESTkey0000000000000000042"


def bearer(user: str, role: str = "user") -> dict:
    return {"Authorization": f"Bearer {mint_token(SECRET, user, role=role, ttl_s=600)}"}


def database_down(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == "database_unavailable", body
    assert "database is not reachable" in (body.get("message") or body.get("detail"))


async def test_every_route_answers_a_database_outage_with_503_and_a_sentence(
    private_postgres, kafka_bootstrap, kafka_topics
):
    common = dict(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=kafka_topics,
        database_url=private_postgres.url,
        auth_jwt_secret=SECRET,
    )
    credit_settings = CreditSettings(**common, relay_mode="task", deduct_wait_s=1)
    # No credit service listens at credits_url: platform calls cannot read a balance either.
    chat_settings = ChatSettings(
        **common, cookie_secure=False, credits_url=f"http://127.0.0.1:{free_port()}", credits_timeout_s=1
    )
    chat_app = create_app(chat_settings, lambda s: wire(s, checker=FakeChecker()))
    async with running(credit_settings) as runtime, chat_app.router.lifespan_context(chat_app):
        credits = httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.api()), base_url="http://credits")
        chat = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=chat_app), base_url="http://chat", headers=bearer("alice")
        )
        async with credits, chat:
            # Up: a user on their own key, with the key in the session.
            r = await chat.post(
                "/settings/model",
                json={"provider": "openai", "model": "gpt-4o", "use_own_key": True, "api_key": USER_KEY},
            )
            assert r.status_code == 200, r.text
            chat.cookies.set("byok_key", r.cookies["byok_key"])
            grant = {"grant_key": "g1", "user_id": "alice", "plan": "free"}
            assert (
                await credits.post("/api/admin/grants", json=grant, headers=bearer("ops", "admin"))
            ).status_code == 201

            private_postgres.stop()

            database_down(await credits.get("/api/credits/alice", headers=bearer("alice")))
            database_down(
                await credits.post(
                    "/api/admin/grants", json={**grant, "grant_key": "g2"}, headers=bearer("ops", "admin")
                )
            )
            database_down(
                await credits.post(
                    "/api/user/deduct-credits",
                    headers=bearer("alice"),
                    json={"feature": "chat", "model": "gpt-4o", "key_source": "byok", "idempotency_key": "k1"},
                )
            )
            assert (await credits.get("/healthz")).status_code == 503

            database_down(await chat.get("/api/model-settings"))
            database_down(await chat.post("/settings/model", json={"provider": "openai", "model": "gpt-4o"}))
            database_down(await chat.post("/chat", json={"message": "hello"}))  # BYOK chat: its event has nowhere to go
            r = await chat.post("/chat", json={"feature": "code_fix", "message": "fix"})
            assert r.status_code == 503 and r.json()["error"] in ("database_unavailable", "credits_unavailable"), r.text
            assert (await chat.get("/healthz")).status_code == 503
