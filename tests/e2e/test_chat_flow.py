"""The chat service end to end: real processes (chat, credits, validation) on the real broker and
database, the provider simulator as the only fake. Platform and BYOK users call every feature."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from infra.harness import ServiceProcess
from services.chat.identity import mint_token
from services.provider_simulator import SimulatorServer
from tests.conftest import Stack

pytestmark = pytest.mark.e2e
SECRET = "e2e-chat-secret-0123456789abcdef"


@dataclass
class ChatSystem:
    chat: ServiceProcess
    credits: ServiceProcess
    validation: ServiceProcess | None
    sim: SimulatorServer
    log_dir: Path

    def token(self, user: str, role: str = "user") -> str:
        return mint_token(SECRET, user, role=role, ttl_s=600)

    def grant(self, user: str, plan: str) -> None:
        r = httpx.post(
            f"{self.credits.url}/api/admin/grants",
            json={"grant_key": f"test:{user}:{plan}", "user_id": user, "plan": plan},
            headers={"Authorization": f"Bearer {self.token('ops', 'admin')}"},
        )
        assert r.status_code in (200, 201), r.text

    def client(self, user: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token(user)}"} if user else {}
        return httpx.Client(base_url=self.chat.url, headers=headers, timeout=30)

    def balance(self, user: str) -> int:
        r = httpx.get(f"{self.credits.url}/api/credits/{user}", headers={"Authorization": f"Bearer {self.token(user)}"})
        return r.json()["balance"] if r.status_code == 200 else 0

    def wait_balance(self, user: str, expected: int, within_s: float = 60) -> int:
        """The balance once it reached `expected` (debits are applied asynchronously), or the last seen."""
        deadline = time.monotonic() + within_s
        while (seen := self.balance(user)) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        return seen


def start_system(
    kafka_bootstrap: str,
    database_url: str,
    schema: str,
    prefix: str,
    log_dir: Path,
    with_validation: bool = True,
    validation_env: dict[str, str] | None = None,
    credits_env: dict[str, str] | None = None,
    **chat_env: str,
) -> Iterator[ChatSystem]:
    sim = SimulatorServer().start()
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "DATABASE_URL": database_url,
        "DATABASE_SCHEMA": schema,
        "TOPIC_PREFIX": prefix,
        "AUTH_JWT_SECRET": SECRET,
        **sim.env(),
    }
    started: list[ServiceProcess] = []
    try:
        credits = ServiceProcess("credits", "services.credits", {**env, **(credits_env or {})}, log_dir).start()
        started.append(credits)
        validation = None
        if with_validation:
            validation = ServiceProcess(
                "validation", "services.validation", {**env, **(validation_env or {})}, log_dir
            ).start()
            started.append(validation)
        chat = ServiceProcess(
            "chat",
            "services.chat",
            {
                **env,
                "CREDITS_URL": credits.url,
                "CHAT_DEV_LOGIN": "true",
                "COOKIE_SECURE": "false",
                **chat_env,
            },
            log_dir,
        ).start()
        started.append(chat)
        yield ChatSystem(chat, credits, validation, sim, log_dir)
    finally:
        for p in reversed(started):
            p.stop()
        sim.stop()


@pytest.fixture
def system(stack: Stack, tmp_path: Path) -> Iterator[ChatSystem]:
    yield from start_system(
        stack.kafka_bootstrap, stack.database_url, stack.database_schema, stack.topic_prefix, tmp_path / "logs"
    )


def use_settings(
    client: httpx.Client, provider: str, model: str, own: bool = False, key: str | None = None
) -> httpx.Response:
    body = {"provider": provider, "model": model, "use_own_key": own}
    if key is not None:
        body["api_key"] = key
    return client.post("/settings/model", json=body)


def test_platform_and_byok_users_are_billed_by_the_policy(system: ChatSystem):
    system.grant("plat", "standard")  # 500
    system.grant("byok", "free")  # 50
    plat, byok = system.client("plat"), system.client("byok")

    # Platform user: every feature on the platform's key.
    assert use_settings(plat, "openai", "gpt-4o").status_code == 200
    charged = 0
    for feature, credits in [("chat", 5), ("deep_analysis", 50), ("code_fix", 1), ("code_canvas", 1)]:
        r = plat.post("/chat", json={"feature": feature, "message": f"please {feature}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["key_source"] == "platform" and body["billing"]["credits"] == credits
        assert body["billing"]["decision"] == "debited" and body["usage"]["input_tokens"] > 0
        charged += credits
    assert system.wait_balance("plat", 500 - charged) == 500 - charged

    # BYOK user: a key checked by the validation worker, then chat on it for free.
    user_key = "gsk_valid" + "7" * 24
    r = use_settings(byok, "groq", "llama-3.3-70b-versatile", own=True, key=user_key)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "valid" and r.json()["key_hint"] == "gsk_…7777"
    byok.cookies.set("byok_key", r.cookies["byok_key"])  # the cookie jar keeps it like a browser would
    for _ in range(3):
        r = byok.post("/chat", json={"feature": "chat", "message": "hello"})
        assert r.status_code == 200, r.text
        assert r.json()["key_source"] == "byok" and r.json()["billing"]["decision"] == "not_billed_byok"
    assert system.sim.state.calls(user_key) >= 4  # the check and three chats ran on the user's key
    # The other features run on the platform and are billed even with BYOK on.
    for feature in ("code_fix", "code_canvas"):
        r = byok.post("/chat", json={"feature": feature, "message": "fix"})
        assert r.json()["key_source"] == "platform" and r.json()["billing"]["credits"] == 1
    assert system.wait_balance("byok", 48) == 48

    # The user's key gets revoked at the provider: the next call says so and marks the key.
    system.sim.state.register(user_key, "revoked")
    r = byok.post("/chat", json={"feature": "chat", "message": "hello"})
    assert r.status_code == 502 and r.json()["key_status"] == "revoked_or_expired"
    assert "revoked" in r.json()["message"] and r.json()["billing"]["charged"] is False
    view = byok.get("/api/model-settings").json()
    assert view["byok"] is True and view["key_status"] == "revoked_or_expired"

    # Deep analysis costs 50: with 48 left it is refused before any provider call.
    r = byok.post("/chat", json={"feature": "deep_analysis", "message": "deep"})
    assert r.status_code == 402 and r.json()["reason"] == "insufficient_credits"
    assert system.wait_balance("byok", 48) == 48 and system.wait_balance("plat", 443) == 443


def test_a_refused_key_changes_nothing_and_the_answer_says_why(system: ChatSystem):
    alice = system.client("alice")
    assert use_settings(alice, "openai", "gpt-4o").status_code == 200
    for key, status in [
        ("sk-proj-noquota" + "0" * 20, "quota_exhausted"),
        ("sk-proj-revoked" + "0" * 20, "revoked_or_expired"),
        ("sk-not-a-key", "malformed"),
    ]:
        r = use_settings(alice, "openai", "gpt-4o", own=True, key=key)
        assert r.status_code == 400 and r.json()["status"] == status and not r.json()["accepted"], r.text
        assert r.json()["message"]
        assert "byok_key" not in r.cookies
    view = alice.get("/api/model-settings").json()
    assert view["byok"] is False and view["key_hint"] is None


def test_users_cannot_reach_each_others_settings_or_balance(system: ChatSystem):
    system.grant("bob", "free")
    alice, bob = system.client("alice"), system.client("bob")
    r = use_settings(bob, "anthropic", "claude-sonnet-4", own=True, key="sk-ant-api03-valid" + "b" * 20)
    assert r.status_code == 200
    bob_cookie = r.cookies["byok_key"]
    # Alice sees and changes only her own settings, whatever she puts in the body or cookies.
    assert alice.get("/api/model-settings").json()["user_id"] == "alice"
    assert use_settings(alice, "openai", "gpt-4o").json()["settings"]["user_id"] == "alice"
    r = alice.post("/settings/model", json={"provider": "openai", "model": "o1", "user_id": "bob"})
    assert r.status_code == 422
    view = alice.get("/api/model-settings", cookies={"byok_key": bob_cookie}).json()
    assert view["user_id"] == "alice" and view["key_in_session"] is False
    assert bob.get("/api/model-settings", cookies={"byok_key": bob_cookie}).json()["model"] == "claude-sonnet-4"
    # Balances: only one's own, through chat and at the credit service.
    assert alice.get("/api/balance").json()["user_id"] == "alice"
    r = httpx.get(f"{system.credits.url}/api/credits/bob", headers={"Authorization": f"Bearer {system.token('alice')}"})
    assert r.status_code == 403
    assert alice.get("/api/model-settings", headers={"Authorization": "Bearer forged"}).status_code == 401


def test_dev_sign_in_sets_the_session_cookie_and_logout_discards_the_key(system: ChatSystem):
    with httpx.Client(base_url=system.chat.url) as browser:
        r = browser.post("/auth/dev-login", json={"user_id": "carol"})
        assert r.status_code == 200 and r.json()["welcome_grant"]["plan"] == "free"
        me = browser.get("/api/me").json()
        assert (me["user_id"], me["role"]) == ("carol", "user") and me["session_expires_at"] > time.time()
        r = use_settings(browser, "gemini", "gemini-2.5-flash", own=True, key="AIzaSyValid" + "c" * 28)
        assert r.status_code == 200, r.text
        assert browser.post("/chat", json={"message": "hi"}).json()["billing"]["decision"] == "not_billed_byok"
        browser.post("/auth/logout")
        assert browser.get("/api/me").status_code == 401
        browser.post("/auth/dev-login", json={"user_id": "carol"})
        view = browser.get("/api/model-settings").json()
        assert view["byok"] is True and view["key_status"] == "missing" and not view["key_in_session"]
        assert browser.post("/chat", json={"message": "hi"}).status_code == 409


def test_byok_tells_the_truth_keys_per_provider_revocation_fallback_and_usage(system: ChatSystem):
    """DESIGN.md "BYOK tells the truth" on the real stack (PostgreSQL key records, real validation)."""
    system.grant("truth", "free")  # 50
    web = system.client("truth")
    openai_key, groq_key = "sk-proj-valid-truth" + "1" * 20, "gsk_validtruth" + "2" * 20

    def keep_cookie(r: httpx.Response) -> httpx.Response:
        # Kept like a browser would (httpx itself sends Secure cookies only over https).
        if "byok_key" in r.cookies:
            web.cookies.clear()
            web.cookies.set("byok_key", r.cookies["byok_key"])
        return r

    # BYOK on without a key: kept, and chat is refused (409) rather than billed.
    assert use_settings(web, "openai", "gpt-4o-mini", own=True).status_code == 200
    r = web.post("/chat", json={"message": "hi"})
    assert r.status_code == 409 and r.json()["error"] == "own_key_missing" and "OpenAI" in r.json()["message"]

    # Two providers' keys side by side; each call uses only the key of the provider the settings name.
    assert keep_cookie(use_settings(web, "openai", "gpt-4o-mini", own=True, key=openai_key)).status_code == 200
    r = keep_cookie(use_settings(web, "groq", "llama3-8b-8192", own=True, key=groq_key))
    assert sorted(k["provider"] for k in r.json()["settings"]["keys"]) == ["groq", "openai"]
    assert web.post("/chat", json={"message": "hi"}).json()["provider"] == "groq"
    assert system.sim.state.calls(groq_key) == 2 and system.sim.state.calls(openai_key) == 1
    # Always-platform features: the platform's configured model, never the user's.
    body = web.post("/chat", json={"feature": "code_fix", "message": "fix"}).json()
    assert (body["provider"], body["model"], body["key_source"], body["billing"]["credits"]) == (
        "openai",
        "gpt-4.1-mini",
        "platform",
        1,
    )

    # Removing the Groq key revokes it on the server: the old cookie copy no longer works for Groq.
    saved = web.cookies.get("byok_key")
    r = keep_cookie(web.delete("/api/keys/groq"))
    assert r.status_code == 200 and r.json()["removed"]
    web.cookies.clear()
    web.cookies.set("byok_key", saved)
    r = web.post("/chat", json={"message": "hi"})
    assert r.status_code == 409 and system.sim.state.calls(groq_key) == 2

    # The explicit fallback: the answer says it ran on platform credits and shows the charge.
    use_settings(web, "groq", "llama3-8b-8192", own=True).raise_for_status()
    web.post(
        "/settings/model",
        json={"provider": "groq", "model": "llama3-8b-8192", "use_own_key": True, "fallback_to_platform": True},
    ).raise_for_status()
    body = web.post("/chat", json={"message": "hi"}).json()
    assert body["fallback"] is True and body["key_source"] == "platform" and body["billing"]["credits"] == 1
    assert "1 credit charged" in body["notice"]
    assert system.wait_balance("truth", 48) == 48

    # The usage history, from the ledger through the credit service: newest first.
    deadline = time.monotonic() + 30
    while len(calls := web.get("/api/usage").json()["calls"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [(c["feature"], c["key_source"], c["decision"], c["credits"]) for c in calls] == [
        ("chat", "platform", "debited", 1),
        ("code_fix", "platform", "debited", 1),
        ("chat", "byok", "not_billed_byok", 0),
    ]
    assert web.get("/api/usage").json()["last_grant"]["credits"] == 50
