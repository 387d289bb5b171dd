"""The gateway's short path (services.chat.api.gateway_path): `POST /v1/chat/completions` answered in
front of FastAPI gets the answers the FastAPI route gives, and a request that fails one of the route's
checks reaches the route whole, which refuses it as before. Fake ports, no services needed."""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import asyncpg
import pytest
from fastapi.testclient import TestClient

from services.chat.api.gateway_path import GatewayPath
from services.chat.app import Wiring, serving_app
from services.chat.bootstrap import key_cookie
from services.chat.identity import AuthError, mint_token
from services.chat.settings import ChatSettings
from services.shared.edge import read_body
from tests.fakes import FakeChecker, FakeProvider, MemoryCredits, MemorySettingsStore, memory_chat

pytestmark = pytest.mark.unit
SECRET = "unit-test-secret-0123456789abcdef"
OWN_KEY = "sk-proj-gatewayTESTkey000000000000000042"
PATH = "/v1/chat/completions"


class Gateway:
    """The chat app as it is served, with a spy between the short path and the FastAPI app."""

    def __init__(self) -> None:
        self.settings = ChatSettings(auth_jwt_secret=SECRET, cookie_secure=False, dev_login=True)
        self.balances = MemoryCredits({"alice": 1000, "bob": 1})
        self.provider = FakeProvider()
        service, self.calls, _ = memory_chat(MemorySettingsStore(), self.balances, self.provider, FakeChecker())

        @contextlib.asynccontextmanager
        async def wire(_):
            yield Wiring(service, self.calls, key_cookie(self.settings), self.balances)

        self.app = serving_app(self.settings, wire)
        assert isinstance(self.app, GatewayPath)
        self.reached: list[bytes] = []  # the gateway bodies the FastAPI app was given
        fastapi_app = self.app.app

        async def spy(scope, receive, send):
            if scope["type"] != "http" or scope["path"] != PATH:
                return await fastapi_app(scope, receive, send)
            parts, more = [], True
            while more:
                message = await receive()
                parts.append(message.get("body", b""))
                more = message.get("more_body", False)
            self.reached.append(b"".join(parts))
            given = [{"type": "http.request", "body": self.reached[-1], "more_body": False}]

            async def again():
                return given.pop() if given else await receive()

            return await fastapi_app(scope, again, send)

        self.app.app = spy


@pytest.fixture
def gateway():
    g = Gateway()
    with TestClient(g.app) as client:
        yield g, client


def bearer(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user, ttl_s=600)}"}


def request(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], **fields}


def chunked(body: Any) -> Any:
    """A body sent without Content-Length: the short path leaves it to the route."""
    yield json.dumps(body).encode() if not isinstance(body, bytes) else body


def comparable(answer: Any) -> Any:
    """An answer without what differs from call to call (its id and time, its event's id, the balance
    after it: the second call of a pair is paid from what the first left)."""
    if isinstance(answer, dict):
        return {k: comparable(v) for k, v in answer.items() if k not in ("id", "created", "event_id", "balance_after")}
    if isinstance(answer, list):
        return [comparable(v) for v in answer]
    return answer


def stream_events(text: str) -> list[Any]:
    return [
        json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
        for line in text.split("\n")
        if line.startswith("data: ")
    ]


def short_and_routed(g: Gateway, client: TestClient, body: dict, headers: list[tuple[str, str]]) -> tuple[Any, Any]:
    """The request through the short path, then the same one through the FastAPI route."""
    short = client.post(PATH, json=body, headers=headers)
    assert g.reached == [], "the short path handed a request it can answer to the route"
    routed = client.post(PATH, content=chunked(body), headers=[*headers, ("content-type", "application/json")])
    assert len(g.reached) == 1, "a request without Content-Length goes to the route"
    g.reached.clear()
    return short, routed


def test_calls_the_route_could_answer_are_answered_in_front_of_it_alike(gateway):
    g, client = gateway

    def both(user: str, body: dict, **headers: str):
        return short_and_routed(g, client, body, [*bearer(user).items(), *headers.items()])

    platform = both("alice", request())
    own_key = both("alice", request(), **{"X-Provider-Key": OWN_KEY})
    for (short, routed), key_source, charged in ((platform, "platform", True), (own_key, "byok", False)):
        assert short.status_code == routed.status_code == 200, (short.text, routed.text)
        assert comparable(short.json()) == comparable(routed.json())
        assert short.json()["object"] == "chat.completion" and short.json()["choices"][0]["message"]["content"]
        assert (short.json()["billing"]["key_source"], short.json()["billing"]["charged"]) == (key_source, charged)
        assert short.headers["content-type"] == routed.headers["content-type"] == "application/json"
    assert platform[0].json()["billing"]["balance_after"] - platform[1].json()["billing"]["balance_after"] == 5
    assert OWN_KEY not in own_key[0].text

    short, routed = both("alice", request(stream=True, stream_options={"include_usage": True}))
    assert short.status_code == routed.status_code == 200
    assert short.headers["content-type"].startswith("text/event-stream")
    assert short.headers["content-type"] == routed.headers["content-type"]
    events = stream_events(short.text)
    assert comparable(events) == comparable(stream_events(routed.text)) and events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] > 0

    # Refusals of the call use case, answered alike in OpenAI's shape: short of credits (402), one
    # Idempotency-Key for two bodies (422).
    short, routed = both("bob", request())
    assert short.status_code == routed.status_code == 402
    assert comparable(short.json()) == comparable(routed.json()) and short.json()["error"]["message"]
    assert short.headers["x-should-retry"] == routed.headers["x-should-retry"] == "false"
    key = str(uuid.uuid4())
    first = client.post(PATH, json=request(), headers={**bearer("alice"), "Idempotency-Key": key})
    short, routed = both("alice", request(messages=[{"role": "user", "content": "other"}]), **{"Idempotency-Key": key})
    assert short.status_code == routed.status_code == 422
    assert short.json() == routed.json() and short.json()["error"]["code"] == "idempotency_key_reused"
    # The same key and body: the call's outcome again, by either path, and one provider call for it.
    asked = len(g.provider.calls)
    short, routed = both("alice", request(), **{"Idempotency-Key": key})
    assert first.json() == short.json() == routed.json()
    assert len(g.provider.calls) == asked


def test_requests_that_fail_a_check_reach_the_route_whole_and_are_refused_as_before(gateway):
    g, client = gateway
    body = request()
    refusals = [
        (401, client.post(PATH, json=body)),
        (401, client.post(PATH, json=body, headers={"Authorization": "Bearer forged"})),
        (422, client.post(PATH, json={"messages": body["messages"]}, headers=bearer("alice"))),
        (422, client.post(PATH, json=request(tools=[{"type": "function"}]), headers=bearer("alice"))),
        (422, client.post(PATH, json=request(messages=[{"role": "user", "content": " "}]), headers=bearer("alice"))),
        (422, client.post(PATH, json=body, headers={**bearer("alice"), "X-Feature": "nope"})),
        (422, client.post(PATH, json=body, headers={**bearer("alice"), "X-Provider-Key": "k" * 1025})),
        (
            422,
            client.post(PATH, content=b"{not json", headers={**bearer("alice"), "Content-Type": "application/json"}),
        ),
    ]
    assert [(s, r.status_code) for s, r in refusals] == [(s, s) for s, _ in refusals]
    for _, answer in refusals:
        error = answer.json()["error"]  # OpenAI's shape, which the SDKs raise as their classes
        assert isinstance(error["message"], str) and len(error["message"]) > 10 and error["type"]
    assert len(g.reached) == len(refusals), "each refusal was the route's"
    assert json.loads(g.reached[2]) == {"messages": body["messages"]}  # whole, as it was sent
    assert g.provider.calls == [], "nothing refused reached a provider"


def test_an_outage_is_answered_as_the_route_answers_it(gateway, monkeypatch):
    g, client = gateway

    async def away(*_: Any, **__: Any) -> Any:
        raise asyncpg.CannotConnectNowError("the database system is starting up")

    monkeypatch.setattr(g.calls, "start", away)
    short, routed = short_and_routed(g, client, request(), list(bearer("alice").items()))
    assert short.status_code == routed.status_code == 503
    assert short.json() == routed.json() and short.json()["error"]["code"] == "database_unavailable"
    assert short.headers["retry-after"] == routed.headers["retry-after"]


def test_every_cookie_header_counts_as_the_route_counts_them(gateway):
    """A client (or proxy) may send its cookies in several Cookie headers: the caller and their keys
    are read from all of them, later ones winning, as Starlette reads them for the route."""
    g, client = gateway
    alice, bob = (mint_token(SECRET, user, ttl_s=600) for user in ("alice", "bob"))
    cookies = [("cookie", f"byok_session={alice}"), ("cookie", f"byok_session={bob}")]
    short, routed = short_and_routed(g, client, request(), cookies)
    assert short.status_code == routed.status_code == 402  # bob's session, bob's 1 credit
    assert comparable(short.json()) == comparable(routed.json())


def test_a_caller_signed_out_during_the_start_gets_the_routes_401(gateway, monkeypatch):
    g, client = gateway

    async def signed_out(*_: Any, **__: Any) -> Any:
        raise AuthError("this session was signed out; sign in again")

    monkeypatch.setattr(g.calls, "start", signed_out)
    short, routed = short_and_routed(g, client, request(), list(bearer("alice").items()))
    assert short.status_code == routed.status_code == 401
    assert short.json() == routed.json() and short.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("declared_more", [True, False])
async def test_a_body_past_the_limit_is_handed_on_whole_and_a_client_that_left_gets_nothing(declared_more):
    """The short paths' body reader (services.shared.edge.read_body): a body larger than the limit
    (more than its Content-Length said) goes on to the app, what was read replayed and the rest still
    to come, so the app's body limit answers it; a client that left first is not answered."""
    sent = [
        {"type": "http.request", "body": b"x" * 8, "more_body": True},
        {"type": "http.request", "body": b"y" * 8, "more_body": declared_more},
    ]
    if declared_more:
        sent.append({"type": "http.request", "body": b"z" * 8, "more_body": False})
    queue = list(sent)

    async def receive():
        return queue.pop(0)

    given: list[bytes] = []

    async def app(scope, receive, send):
        more = True
        while more:
            message = await receive()
            given.append(message["body"])
            more = message.get("more_body", False)

    assert await read_body(app, 10, {"type": "http"}, receive, None) is None
    assert b"".join(given) == b"".join(m["body"] for m in sent)  # the app read it all, in order
    assert given[0] == b"x" * 8 + b"y" * 8

    left = [{"type": "http.request", "body": b"x", "more_body": True}, {"type": "http.disconnect"}]

    async def leaving():
        return left.pop(0)

    given.clear()
    assert await read_body(app, 10, {"type": "http"}, leaving, None) is None
    assert given == []
    whole = [{"type": "http.request", "body": b"ok", "more_body": False}]

    async def small():
        return whole.pop(0)

    assert await read_body(app, 10, {"type": "http"}, small, None) == b"ok"
