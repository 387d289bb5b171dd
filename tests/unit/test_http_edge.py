"""The HTTP edge of chat and credits (DESIGN "Bounds of input"), with fake ports: every bad request
gets a 4xx with a sentence, never a 500, and nothing reaches a provider it should not."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import asyncpg
import httpx
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

import providers
from billing.pricing import default_price_book
from schemas.events import Feature, Provider
from services.chat.app import Wiring, create_app
from services.chat.bootstrap import key_cookie
from services.chat.credit_account import HttpCreditAccount
from services.chat.credits_client import CreditsClient
from services.chat.settings import ChatSettings
from services.chat.store import ModelSettings
from services.credits.api import ApiContext, build_api
from services.credits.api.deps import identity
from services.credits.settings import CreditSettings
from services.shared.auth import mint_token
from services.shared.settings import DefaultSecret, refuse_default_secrets
from tests.fakes import FakeChecker, FakeProvider, InProcessHttp, MemoryCredits, MemorySettingsStore, memory_chat
from tests.support import PLATFORM_KEY, ROOT, free_port

pytestmark = pytest.mark.unit
SECRET = "unit-test-secret-0123456789abcdef"
USER_KEY = "AIzaSyEdgeTESTkey000000000000000000042"
TRAVERSAL = "../../../openai/v1/chat/completions?x="
BIG = 70 * 1024


class Chat:
    def __init__(self, store=None, balances=None, feature_models=None, **settings):
        self.settings = ChatSettings(auth_jwt_secret=SECRET, cookie_secure=False, dev_login=True, **settings)
        self.store = store or MemorySettingsStore()
        self.provider, self.checker = FakeProvider(), FakeChecker()
        balances = balances or MemoryCredits({"alice": 1000})
        self.service, self.calls, self.outbox = memory_chat(
            self.store, balances, self.provider, self.checker, feature_models=feature_models
        )

        @contextlib.asynccontextmanager
        async def wire(_):
            yield Wiring(self.service, self.calls, key_cookie(self.settings), balances)

        self.app = create_app(self.settings, wire)

    @contextlib.contextmanager
    def client(self, user: str | None = "alice"):
        with TestClient(self.app) as client:
            if user:
                client.headers["Authorization"] = f"Bearer {mint_token(SECRET, user, ttl_s=600)}"
            yield client


def refused_with_a_sentence(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    sentence = body.get("message") or body.get("detail")
    assert isinstance(sentence, str) and len(sentence) > 15, body
    for word in words:
        assert word in sentence, sentence
    return body


def chunks(size: int):
    for _ in range(size // 4096 + 1):
        yield b"x" * 4096


# --- body limit -----------------------------------------------------------------------------------


def test_chat_refuses_an_oversized_body_with_413_before_it_asks_who_is_calling():
    chat = Chat()
    with chat.client(user=None) as client:
        r = client.post("/chat", content=b"{" + b" " * BIG + b"}", headers={"content-type": "application/json"})
        refused_with_a_sentence(r, 413, "64 KiB")  # not 401: the body was not read, nobody asked
        # Sent in chunks, without a Content-Length, it is counted as it comes.
        r = client.post("/settings/model", content=chunks(BIG), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        refused_with_a_sentence(r, 413, "64 KiB")
    assert chat.provider.calls == [] and chat.outbox.rows == {}


def test_the_body_limit_is_configurable_and_a_body_within_it_is_served():
    chat = Chat(http_max_body_bytes=2048)
    with chat.client() as client:
        refused_with_a_sentence(client.post("/chat", json={"message": "x" * 3000}), 413, "2 KiB")
        assert client.post("/chat", json={"message": "hello"}).status_code == 200
        # Chunked and within the limit: read whole and served.
        body = b'{"message": "hi"}'
        r = client.post("/chat", content=iter([body[:5], body[5:]]), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


class FakeLedger:
    """Records whether the credit service's routes reached the ledger at all."""

    def __init__(self, error: BaseException | None = None):
        self.calls, self.error = [], error

    async def _touch(self, name, *args):
        self.calls.append(name)
        if self.error:
            raise self.error

    async def balance(self, user_id):
        await self._touch("balance", user_id)

    async def grant(self, *args):
        await self._touch("grant", *args)

    async def decision_of(self, event_id):
        await self._touch("decision_of", event_id)
        return None


def credits_app(ledger=None, **settings) -> tuple[TestClient, FakeLedger]:
    ledger = ledger or FakeLedger()
    ctx = ApiContext(CreditSettings(auth_jwt_secret=SECRET, **settings), ledger, default_price_book())
    return TestClient(build_api(ctx)), ledger


def admin() -> dict:
    return {"Authorization": f"Bearer {mint_token(SECRET, 'ops', role='admin')}"}


def test_credits_refuses_an_oversized_body_with_413_before_authentication():
    client, ledger = credits_app()
    r = client.post("/api/admin/grants", content=b"x" * BIG, headers={"content-type": "application/json"})
    refused_with_a_sentence(r, 413, "64 KiB")
    r = client.post("/api/user/deduct-credits", content=chunks(BIG), headers={"content-type": "application/json"})
    refused_with_a_sentence(r, 413)
    assert ledger.calls == []


async def test_credits_remembers_a_verified_token_until_its_expiry_and_never_past_a_sign_out():
    """The credit service checks a token's signature once (the chat sends one user's token with every
    hold): a remembered token is refused once it expires or its session is signed out, and a forged one
    is never taken."""
    ctx = ApiContext(CreditSettings(auth_jwt_secret=SECRET), None, None)
    now = [time.time()]
    ctx.tokens.clock = lambda: now[0]
    signed_out: set[str] = set()
    ctx.sessions = SimpleNamespace(is_revoked=lambda who: who.session_id in signed_out)
    token = mint_token(SECRET, "alice", ttl_s=60, session_id="s-1")
    assert (await identity(ctx, f"Bearer {token}")).user_id == "alice"
    assert (await identity(ctx, f"Bearer {token}")).user_id == "alice"  # remembered
    forged = mint_token(SECRET + "-not-ours", "alice", ttl_s=60, session_id="s-1")
    with pytest.raises(HTTPException) as refused:
        await identity(ctx, f"Bearer {forged}")
    assert refused.value.status_code == 401 and "invalid token" in refused.value.detail
    signed_out.add("s-1")
    with pytest.raises(HTTPException) as refused:
        await identity(ctx, f"Bearer {token}")
    assert refused.value.status_code == 401 and "signed out" in refused.value.detail
    signed_out.clear()
    now[0] += 61
    with pytest.raises(HTTPException) as refused:
        await identity(ctx, f"Bearer {token}")
    assert refused.value.status_code == 401 and "expired" in refused.value.detail


# --- ids and model ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o\x07", "gpt\x00-4o", "gpt-4o\n", TRAVERSAL, "gemini/../x", "a" * 101, ""])
def test_settings_refuse_a_model_that_is_not_a_model_id(model):
    chat = Chat()
    with chat.client() as client:
        r = client.post("/settings/model", json={"provider": "gemini", "model": model, "use_own_key": False})
        refused_with_a_sentence(r, 422, "body/model")
        assert model not in r.text or not model  # where, not what
    assert chat.store.rows == {}


def test_settings_refuse_a_lone_surrogate_in_the_model():
    chat = Chat()
    with chat.client() as client:
        r = client.post(
            "/settings/model",
            content=b'{"provider": "openai", "model": "gpt-4o\\ud800"}',
            headers={"content-type": "application/json"},
        )
        refused_with_a_sentence(r, 422, "body/model")
    assert chat.store.rows == {}


def test_chat_refuses_a_lone_surrogate_in_the_message_and_a_body_that_is_not_utf8():
    chat = Chat()
    with chat.client() as client:
        r = client.post("/chat", content=b'{"message": "hi\\ud800"}', headers={"content-type": "application/json"})
        refused_with_a_sentence(r, 422, "not valid JSON")
        r = client.post(
            "/settings/model",
            content=b'{"provider": "openai", "model": "gpt\xff"}',
            headers={"content-type": "application/json"},
        )
        refused_with_a_sentence(r, 422, "UTF-8")
    assert chat.provider.calls == [] and chat.outbox.rows == {}


def test_a_saved_model_that_is_not_an_id_reaches_no_provider_and_is_no_500():
    # Settings saved before ids were checked: every /chat of that user used to be a 500.
    store = MemorySettingsStore()
    chat = Chat(store=store)
    for model in ["gpt-4o\x07", TRAVERSAL]:
        store.rows["alice"] = ModelSettings("alice", Provider.GEMINI, model)
        with chat.client() as client:
            body = refused_with_a_sentence(client.post("/chat", json={"message": "hi"}), 422, "model")
            assert body["error"] == "invalid_request" and body["reason"] == "invalid_model"
            assert client.get("/api/model-settings").status_code == 200  # the page can still show and fix it
    assert chat.provider.calls == [] and chat.outbox.rows == {}


@pytest.mark.parametrize("feature", ["code_fix", "code_canvas", "deep_analysis", "chat"])
def test_the_platform_key_runs_no_unpriced_model_whatever_the_feature_costs(feature):
    # Chat runs the user's model; the other features the platform's configured one (here one the
    # price list does not know): at a flat feature price, either used to run.
    chat = Chat(feature_models={Feature(feature): (Provider.GEMINI, "my-own-finetune")} if feature != "chat" else None)
    with chat.client() as client:
        assert (
            client.post("/settings/model", json={"provider": "gemini", "model": "my-own-finetune"}).status_code == 200
        )
        body = refused_with_a_sentence(
            client.post("/chat", json={"feature": feature, "message": "fix"}), 402, "no platform price"
        )
        assert body["reason"] == "unpriced_model" and body["price_list_version"]
    assert chat.provider.calls == [] and chat.outbox.rows == {}


def test_a_chat_sent_on_what_the_page_no_longer_shows_is_409_with_the_route_it_would_take():
    chat = Chat()
    with chat.client() as client:
        assert client.post("/settings/model", json={"provider": "openai", "model": "gpt-4o"}).status_code == 200
        line = client.get("/api/model-settings").json()["features"]["chat"]
        shown = {k: line[k] for k in ("key_source", "model", "credits")}
        assert shown == {"key_source": "platform", "model": "gpt-4o", "credits": 5}
        assert client.post("/settings/model", json={"provider": "openai", "model": "o1"}).status_code == 200
        body = refused_with_a_sentence(
            client.post("/chat", json={"message": "hi", "shown": shown}), 409, "o1 on platform credits, 20 credits"
        )
        assert body["error"] == "settings_changed" and body["route"]["model"] == "o1"
        for bad in ({"model": "o1"}, {**shown, "credits": -1}, {**shown, "key_source": "free"}, {**shown, "x": 1}):
            r = client.post("/chat", json={"message": "hi", "shown": bad})
            assert r.status_code == 422 and "shown" in r.text, (bad, r.text)
        assert chat.provider.calls == [] and chat.outbox.rows == {}
        ok = client.post("/chat", json={"message": "hi", "shown": {**shown, "model": "o1", "credits": 20}})
        assert ok.status_code == 200 and ok.json()["billing"]["credits"] == 20, ok.text
    assert len(chat.provider.calls) == 1


def test_the_gemini_model_never_leaves_its_url_path_segment():
    settings = providers.ProviderSettings(gemini_base_url="https://gemini.example")
    assert (
        settings.chat_url(Provider.GEMINI, "gemini-2.5-pro")
        == "https://gemini.example/v1beta/models/gemini-2.5-pro:generateContent"
    )
    for model in [TRAVERSAL, "a/b", "a?b", "a#b", "a%2fb", "gemini\x00"]:
        with pytest.raises(providers.InvalidModelId):
            settings.chat_url(Provider.GEMINI, model)


async def test_a_gemini_call_with_a_bad_model_sends_nothing():
    sent = []
    client = InProcessHttp(transport=httpx.MockTransport(lambda request: sent.append(request)))
    settings = providers.ProviderSettings(gemini_base_url="https://gemini.example")
    with pytest.raises(providers.InvalidModelId):
        await providers.chat_completion(
            client, settings, Provider.GEMINI, PLATFORM_KEY, TRAVERSAL, [{"role": "user", "content": "hi"}]
        )
    await client.aclose()
    assert sent == []


@pytest.mark.parametrize(
    "path", ["/api/credits/al%00ice", "/api/credits/al%07ice", "/api/credits/al%E2%80%8Bice", "/api/credits/al%0Aice"]
)
def test_a_balance_read_refuses_an_id_with_control_characters(path):
    client, ledger = credits_app()
    refused_with_a_sentence(client.get(path, headers=admin()), 422, "path/user_id", "printable")
    assert ledger.calls == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"grant_key": "g1", "user_id": "al\\u0000ice", "plan": "free"}',
        b'{"grant_key": "g\\ud800", "user_id": "alice", "plan": "free"}',
        b'{"grant_key": "g1", "user_id": "alice\\udfff", "plan": "free"}',
        b'{"grant_key": "g1", "user_id": "alice", "plan": "fr\\u0007ee"}',
    ],
)
def test_a_grant_refuses_ids_with_control_characters_or_lone_surrogates(raw):
    client, ledger = credits_app()
    body = refused_with_a_sentence(
        client.post("/api/admin/grants", content=raw, headers={**admin(), "content-type": "application/json"}),
        422,
        "body/",
    )
    assert body["error"] == "invalid_request"
    assert ledger.calls == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("idempotency_key", "k\u0000"),
        ("idempotency_key", "k\u2028"),
        ("model", "gpt-4o\u0007"),
        ("model", "gpt 4o"),
        ("model", TRAVERSAL),
    ],
)
def test_the_compatibility_deduct_refuses_bad_ids(field, value):
    client, ledger = credits_app()
    body = {"feature": "chat", "model": "gpt-4o", "key_source": "platform", "idempotency_key": "k1", field: value}
    r = client.post(
        "/api/user/deduct-credits", json=body, headers={"Authorization": f"Bearer {mint_token(SECRET, 'alice')}"}
    )
    refused_with_a_sentence(r, 422, f"body/{field}")
    assert ledger.calls == []


def test_a_token_whose_subject_is_not_printable_is_refused():
    client, ledger = credits_app()
    token = mint_token(SECRET, "al\x00ice")
    assert client.get("/api/credits/alice", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert ledger.calls == []


# --- outages --------------------------------------------------------------------------------------


class DownStore(MemorySettingsStore):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    async def get(self, user_id):
        raise self.error

    async def put(self, settings):
        raise self.error

    async def load(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    ],
)
def test_chat_answers_a_database_outage_with_503_and_a_sentence_on_every_route(error):
    chat = Chat(store=DownStore(error))
    with chat.client() as client:
        for method, path, body in [
            ("GET", "/api/model-settings", None),
            ("POST", "/settings/model", {"provider": "openai", "model": "gpt-4o"}),
            ("POST", "/chat", {"message": "hi"}),
        ]:
            r = client.request(method, path, json=body)
            refused_with_a_sentence(r, 503, "database")
            assert r.json()["error"] == "database_unavailable"
    assert chat.provider.calls == []


def test_credits_answers_database_and_kafka_outages_with_503_and_a_sentence():
    client, _ = credits_app(ledger=FakeLedger(OSError(111, "Connect call failed")))
    for r in [
        client.get("/api/credits/alice", headers=admin()),
        client.post("/api/admin/grants", headers=admin(), json={"grant_key": "g", "user_id": "a", "plan": "free"}),
    ]:
        assert refused_with_a_sentence(r, 503, "database")["error"] == "database_unavailable"
    # The compatibility route records its event in the ledger's outbox: a Kafka outage only delays its
    # decision (202), the database's is a 503 like every route's.
    client, ledger = credits_app(ledger=FakeLedger(asyncpg.exceptions.ConnectionDoesNotExistError("closed")))
    r = client.post(
        "/api/user/deduct-credits",
        headers={"Authorization": f"Bearer {mint_token(SECRET, 'alice')}"},
        json={"feature": "chat", "model": "gpt-4o", "key_source": "platform", "idempotency_key": "k"},
    )
    assert refused_with_a_sentence(r, 503, "database")["error"] == "database_unavailable"


async def test_a_byok_chat_works_while_the_credit_service_is_down():
    credits = CreditsClient(f"http://127.0.0.1:{free_port()}", timeout_s=2)  # nothing listens there
    try:
        chat = Chat(balances=HttpCreditAccount(credits))
        transport = httpx.ASGITransport(app=chat.app)
        async with (
            chat.app.router.lifespan_context(chat.app),
            httpx.AsyncClient(transport=transport, base_url="http://chat") as client,
        ):
            client.headers["Authorization"] = f"Bearer {mint_token(SECRET, 'alice', ttl_s=600)}"
            r = await client.post(
                "/settings/model",
                json={"provider": "gemini", "model": "gemini-2.5-pro", "use_own_key": True, "api_key": USER_KEY},
            )
            assert r.status_code == 200, r.text
            client.cookies.set("byok_key", r.cookies["byok_key"])
            r = await client.post("/chat", json={"message": "hello"})
            assert r.status_code == 200 and r.json()["key_source"] == "byok", r.text
            # Platform calls are paused, with the reason.
            r = await client.post("/chat", json={"feature": "code_fix", "message": "fix"})
            refused_with_a_sentence(r, 503, "platform calls are paused")
    finally:
        await credits.aclose()
    assert [c[1] for c in chat.provider.calls] == [USER_KEY]


# --- default secrets ------------------------------------------------------------------------------


def test_outside_development_default_secrets_are_refused_by_name(monkeypatch):
    monkeypatch.setenv("BYOK_ENV", "production")
    with pytest.raises(DefaultSecret) as refused:
        refuse_default_secrets("The credit service", CreditSettings(database_url="postgresql://db/prod"))
    assert "AUTH_JWT_SECRET" in str(refused.value) and "DATABASE_URL" not in str(refused.value)
    with pytest.raises(DefaultSecret) as refused:
        refuse_default_secrets(
            "The chat service",
            ChatSettings(
                auth_jwt_secret=SECRET,
                database_url="postgresql://x/y",
                openai_api_key="",
                anthropic_api_key=None,
                groq_api_key="gsk_real",
            ),
        )
    assert str(refused.value).count("GEMINI_API_KEY") == 2 and "OPENAI" not in str(refused.value)
    refuse_default_secrets(
        "The credit service", CreditSettings(auth_jwt_secret=SECRET, database_url="postgresql://x/y")
    )
    monkeypatch.setenv("BYOK_ENV", "development")
    refuse_default_secrets("The credit service", CreditSettings())


@pytest.mark.parametrize(
    "module, names",
    [
        ("services.credits", ["AUTH_JWT_SECRET", "DATABASE_URL"]),
        ("services.chat", ["AUTH_JWT_SECRET", "OPENAI_API_KEY", "KEY_SEAL_PUBLIC_KEYS"]),
        ("services.validation", ["KEY_SEAL_PRIVATE_KEYS"]),
    ],
)
def test_a_service_started_outside_development_with_default_secrets_refuses_to_start(module, names):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BYOK_ENV", "AUTH_JWT", "DATABASE_URL", "KEY_SEAL")) and not k.endswith("_API_KEY")
    }
    env["HTTP_PORT"] = str(free_port())
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stdout + done.stderr
    for name in names:
        assert name in done.stderr, done.stderr
    assert "BYOK_ENV=development" in done.stderr
    assert time.monotonic() - started < 60


# --- OpenAPI --------------------------------------------------------------------------------------


def local_refs(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in local_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in local_refs(v)]
    return []


def resolve(document: dict, ref: str):
    node = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


@pytest.mark.parametrize("which", ["chat", "credits"])
def test_the_openapi_documents_are_valid_and_every_reference_resolves(which):
    # The credit service's FastAPI app sits behind the holds' short path (services.credits.api.hold_path).
    app = Chat().app if which == "chat" else build_api(ApiContext(CreditSettings(), None, None)).app
    document = app.openapi()
    validate(document)
    refs = local_refs(document)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/"), ref
        resolve(document, ref)  # raises KeyError for a dangling one, as #/$defs/Feature was
