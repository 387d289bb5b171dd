"""HTTP routes of the chat service with fake ports (no services needed)."""

from __future__ import annotations

import contextlib

import pytest
from fastapi.testclient import TestClient

from schemas.events import KeyCheckStatus, Provider
from services.chat.app import Wiring, create_app
from services.chat.bootstrap import key_cookie
from services.chat.identity import mint_token
from services.chat.settings import ChatSettings
from tests.fakes import FakeChecker, FakeProvider, FixedUsage, MemoryCredits, MemorySettingsStore, memory_chat
from tests.support import PLATFORM_KEY

pytestmark = pytest.mark.unit
SECRET = "unit-test-secret-0123456789abcdef"
USER_KEY = "sk-proj-appTESTkey00000000000000000042"
USAGE = {
    "calls": [
        {
            "time": "2026-12-01T10:00:00+00:00",
            "feature": "chat",
            "provider": "openai",
            "model": "gpt-4o",
            "key_source": "byok",
            "status": "succeeded",
            "decision": "not_billed_byok",
            "credits": 0,
        }
    ],
    "last_grant": {"plan": "free", "credits": 50, "granted_at": "2026-12-01T09:00:00+00:00"},
}


@pytest.fixture
def world():
    settings = ChatSettings(auth_jwt_secret=SECRET, cookie_secure=False, dev_login=True)
    store, provider, checker = MemorySettingsStore(), FakeProvider(), FakeChecker()
    balances = MemoryCredits({"alice": 100, "bob": 7})
    service, calls, outbox = memory_chat(store, balances, provider, checker)

    @contextlib.asynccontextmanager
    async def wire(_):
        yield Wiring(service, calls, key_cookie(settings), balances, usage=FixedUsage({"alice": USAGE}))

    app = create_app(settings, wire)
    with TestClient(app) as client:
        yield client, settings, outbox, provider, checker


def login(client: TestClient, user: str) -> None:
    r = client.post("/auth/dev-login", json={"user_id": user})
    assert r.status_code == 200, r.text


def test_routes_need_identity(world):
    client, *_ = world
    for method, path in [
        ("get", "/api/model-settings"),
        ("post", "/chat"),
        ("post", "/settings/model"),
        ("get", "/api/balance"),
    ]:
        r = client.request(method.upper(), path, json={"provider": "openai", "model": "gpt-4o", "message": "x"})
        assert r.status_code == 401, path
    assert client.get("/api/model-settings", headers={"Authorization": "Bearer forged"}).status_code == 401


def test_dev_login_is_off_unless_configured():
    settings = ChatSettings(auth_jwt_secret=SECRET)
    assert settings.dev_login is False

    @contextlib.asynccontextmanager
    async def wire(_):
        yield Wiring(None, None, key_cookie(settings), MemoryCredits())

    with TestClient(create_app(settings, wire)) as client:
        assert client.post("/auth/dev-login", json={"user_id": "eve"}).status_code == 404


def test_byok_flow_sets_a_sealed_cookie_and_never_echoes_the_key(world):
    client, _, outbox, provider, checker = world
    login(client, "alice")
    r = client.post(
        "/settings/model",
        json={"provider": "openai", "model": "gpt-4o", "use_own_key": True, "api_key": f"  {USER_KEY}\n"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] and body["status"] == "valid" and body["key_check"]["status"] == "valid"
    assert body["key_hint"] == "sk-proj-…0042" and body["settings"]["byok"] is True
    cookie = r.headers["set-cookie"]
    assert "byok_key=" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert checker.calls == [("alice", Provider.OPENAI, USER_KEY)]
    answers = [r.text]

    settings = client.get("/api/model-settings")
    assert settings.json()["byok"] and settings.json()["key_in_session"] and settings.json()["key_status"] == "valid"
    chat = client.post("/chat", json={"feature": "chat", "message": "hi"})
    assert chat.status_code == 200
    assert chat.json()["billing"]["decision"] == "not_billed_byok" and chat.json()["key_source"] == "byok"
    assert provider.calls[-1][1] == USER_KEY
    deep = client.post("/chat", json={"feature": "deep_analysis", "message": "hi"})
    assert deep.json()["billing"]["credits"] == 50 and provider.calls[-1][1] == PLATFORM_KEY
    answers += [settings.text, chat.text, deep.text, *(c for c in r.headers.get_list("set-cookie"))]
    assert not any(USER_KEY in a or USER_KEY[8:] in a for a in answers)
    assert all(USER_KEY not in e.to_json().decode() for e in outbox.events)

    off = client.post("/settings/model", json={"provider": "openai", "model": "gpt-4o", "use_own_key": False})
    assert off.json()["settings"]["byok"] is False
    assert 'byok_key=""' in off.headers["set-cookie"] and "Max-Age=0" in off.headers["set-cookie"]
    assert client.post("/chat", json={"message": "hi"}).json()["key_source"] == "platform"


def test_secure_cookie_flags_are_on_by_default():
    settings = ChatSettings(auth_jwt_secret=SECRET, dev_login=True, dev_login_grant_plan="")

    @contextlib.asynccontextmanager
    async def wire(_):
        yield Wiring(None, None, key_cookie(settings), MemoryCredits())

    with TestClient(create_app(settings, wire)) as client:
        cookie = client.post("/auth/dev-login", json={"user_id": "alice"}).headers["set-cookie"]
        assert "byok_session=" in cookie and "Secure" in cookie and "HttpOnly" in cookie


def test_a_refused_key_answers_400_with_the_check_and_sets_no_cookie(world):
    client, _, _, _, checker = world
    checker.status = KeyCheckStatus.QUOTA_EXHAUSTED
    login(client, "alice")
    r = client.post(
        "/settings/model", json={"provider": "openai", "model": "gpt-4o", "use_own_key": True, "api_key": USER_KEY}
    )
    assert r.status_code == 400 and r.json()["status"] == "quota_exhausted" and not r.json()["accepted"]
    assert "byok_key=" not in r.headers.get("set-cookie", "")
    assert client.get("/api/model-settings").json()["byok"] is False


def test_a_saved_copy_of_the_key_cookie_is_useless_after_byok_off_removal_or_sign_out(world):
    """Finding 7: the server revokes the key, so a copied cookie does not bring it back."""
    client, _, _, provider, _ = world
    login(client, "alice")

    def check_key(provider_name="openai", model="gpt-4o", key=USER_KEY):
        client.cookies.delete("byok_key")
        r = client.post(
            "/settings/model", json={"provider": provider_name, "model": model, "use_own_key": True, "api_key": key}
        )
        assert r.status_code == 200, r.text
        return client.cookies.get("byok_key")

    def chat_with(cookie):
        client.cookies.delete("byok_key")
        client.cookies.set("byok_key", cookie)
        return client.post("/chat", json={"message": "hi"})

    for end in ("byok_off", "remove", "sign_out"):
        if end == "sign_out":
            login(client, "alice")
        saved = check_key()
        assert chat_with(saved).json()["key_source"] == "byok"
        if end == "byok_off":
            r = client.post("/settings/model", json={"provider": "openai", "model": "gpt-4o", "use_own_key": False})
            assert "removed" in r.json()["message"]
            client.post("/settings/model", json={"provider": "openai", "model": "gpt-4o", "use_own_key": True})
        elif end == "remove":
            r = client.delete("/api/keys/openai")
            assert r.status_code == 200 and r.json()["removed"] and r.json()["settings"]["keys"] == []
            assert 'byok_key=""' in r.headers["set-cookie"]
        else:
            session = client.cookies.get("byok_session")
            assert client.post("/auth/logout").json()["keys_revoked"] == 1
            client.cookies.set("byok_session", session)  # a saved copy of the session cookie too
        calls = len(provider.calls)
        r = chat_with(saved)
        assert r.status_code == 409, (end, r.text)
        assert r.json()["error"] == "own_key_missing" and "nothing is charged" in r.json()["message"]
        assert len(provider.calls) == calls


def test_keys_of_several_providers_live_side_by_side_in_one_cookie(world):
    client, _, _, provider, _ = world
    login(client, "alice")
    client.post(
        "/settings/model", json={"provider": "openai", "model": "gpt-4o", "use_own_key": True, "api_key": USER_KEY}
    )
    groq_key = "gsk_" + "q" * 40
    r = client.post(
        "/settings/model",
        json={"provider": "groq", "model": "llama3-8b-8192", "use_own_key": True, "api_key": groq_key},
    )
    keys = {k["provider"]: k for k in r.json()["settings"]["keys"]}
    assert keys.keys() == {"openai", "groq"} and keys["openai"]["key_hint"] == "sk-proj-…0042"
    assert client.post("/chat", json={"message": "hi"}).json()["provider"] == "groq"
    assert provider.calls[-1][1] == groq_key
    client.post("/settings/model", json={"provider": "openai", "model": "gpt-4o", "use_own_key": True})
    assert client.post("/chat", json={"message": "hi"}).json()["key_source"] == "byok"
    assert provider.calls[-1][1] == USER_KEY
    r = client.delete("/api/keys/groq")
    assert [k["provider"] for k in r.json()["settings"]["keys"]] == ["openai"]
    assert client.delete("/api/keys/nope").status_code == 422


def test_fallback_is_a_choice_and_the_answer_says_it_was_used(world):
    client, *_ = world
    login(client, "alice")
    r = client.post("/settings/model", json={"provider": "anthropic", "model": "claude-3-5-haiku", "use_own_key": True})
    assert r.json()["settings"]["fallback_to_platform"] is False
    assert client.post("/chat", json={"message": "hi"}).status_code == 409
    r = client.post(
        "/settings/model",
        json={"provider": "anthropic", "model": "claude-3-5-haiku", "use_own_key": True, "fallback_to_platform": True},
    )
    assert r.json()["settings"]["features"]["chat"]["fallback"] is True
    body = client.post("/chat", json={"message": "hi"}).json()
    assert body["fallback"] is True and body["key_source"] == "platform" and body["billing"]["credits"] == 1
    assert "ran on platform credits" in body["notice"] and "1 credit charged" in body["notice"]


def test_usage_lists_the_users_calls(world):
    client, *_ = world
    assert client.get("/api/usage").status_code == 401
    login(client, "alice")
    body = client.get("/api/usage").json()
    assert body["user_id"] == "alice" and body["calls"] == USAGE["calls"] and body["last_grant"]["credits"] == 50


def test_short_balance_answers_402_suggesting_byok(world):
    client, *_ = world
    login(client, "bob")  # 7 credits
    client.post("/settings/model", json={"provider": "openai", "model": "o1", "use_own_key": False})
    r = client.post("/chat", json={"message": "hi"})
    assert r.status_code == 402 and r.json()["suggest_byok"] is True and "own API key" in r.json()["message"]


def test_a_validation_error_does_not_echo_the_key(world):
    client, *_ = world
    login(client, "alice")
    r = client.post(
        "/settings/model", json={"provider": "nope", "model": "m", "use_own_key": True, "api_key": USER_KEY}
    )
    assert r.status_code == 422 and USER_KEY not in r.text


def test_one_users_key_cookie_is_useless_to_another_user(world):
    client, settings, _, provider, _ = world
    login(client, "alice")
    client.post(
        "/settings/model", json={"provider": "openai", "model": "gpt-4o", "use_own_key": True, "api_key": USER_KEY}
    )
    alice_key_cookie = client.cookies.get("byok_key")
    bob = mint_token(SECRET, "bob")
    client.post(
        "/settings/model",
        json={"provider": "openai", "model": "gpt-4o", "use_own_key": True},
        headers={"Authorization": f"Bearer {bob}"},
    )
    view = client.get(
        "/api/model-settings", headers={"Authorization": f"Bearer {bob}"}, cookies={"byok_key": alice_key_cookie}
    )
    assert view.json()["user_id"] == "bob" and view.json()["key_in_session"] is False
    r = client.post("/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {bob}"})
    assert r.status_code == 409
    assert all(call[1] != USER_KEY for call in provider.calls)


def test_identity_never_comes_from_the_body(world):
    client, *_ = world
    login(client, "alice")
    r = client.post("/settings/model", json={"provider": "openai", "model": "gpt-4o", "user_id": "bob"})
    assert r.status_code == 422
    assert client.get("/api/balance").json() == {"user_id": "alice", "balance": 100, "held": 0, "available": 100}


def test_chat_bodies_are_checked_after_identity_and_refused_with_where_not_what(world):
    client, *_ = world
    assert client.post("/chat", content=b"{not json").status_code == 401  # who first, then the body
    login(client, "alice")
    for body in [
        b"{not json",
        b'{"message": ""}',
        b'{"message": "hi", "user_id": "bob"}',
        b'{"feature": "poems", "message": "x"}',
    ]:
        r = client.post("/chat", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, body
        assert r.json()["error"] == "invalid_request" and r.json()["message"].startswith("body")
    assert "requestBody" in client.get("/openapi.json").json()["paths"]["/chat"]["post"]


def test_chat_refuses_a_body_that_is_not_sent_as_json(world):
    client, _, outbox, provider, _ = world
    login(client, "alice")
    calls = len(provider.calls)
    # What a cross-site HTML form can send: text/plain or a form encoding, with a JSON-looking body.
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]:
        r = client.post(
            "/chat", content=b'{"feature": "chat", "message": "hi"}', headers={"Content-Type": content_type}
        )
        assert r.status_code == 422, content_type
        assert "JSON" in r.json()["message"]
    assert len(provider.calls) == calls
    for content_type in ["application/json", "application/json; charset=utf-8", "application/vnd.api+json"]:
        r = client.post(
            "/chat", content=b'{"feature": "chat", "message": "hi"}', headers={"Content-Type": content_type}
        )
        assert r.status_code == 200, (content_type, r.text)


def test_page_and_health(world):
    client, *_ = world
    page = client.get("/")
    assert page.status_code == 200 and "Use my own API key" in page.text and 'role="switch"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/healthz").json()["status"] == "ok"
    config = client.get("/api/config").json()
    assert config["models"]["gemini"][1] == {"id": "gemini-2.5-flash", "credits": None}
    assert config["feature_models"]["deep_analysis"] == {"provider": "openai", "model": "gpt-4.1"}
    assert config["feature_credits"]["deep_analysis"] == 50 and config["key_lifetime_s"] == 8 * 3600


def test_logout_discards_session_and_key(world):
    client, *_ = world
    login(client, "alice")
    client.post(
        "/settings/model", json={"provider": "openai", "model": "gpt-4o", "use_own_key": True, "api_key": USER_KEY}
    )
    r = client.post("/auth/logout")
    cookies = " ".join(r.headers.get_list("set-cookie"))
    assert 'byok_key=""' in cookies and 'byok_session=""' in cookies
    assert client.get("/api/model-settings").status_code == 401
