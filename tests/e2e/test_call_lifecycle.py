"""The call lifecycle end to end (DESIGN "The call lifecycle"): one user action is one call and at most
one charge, whatever the retry, the dropped connection, the slow provider or the stream's ending.
Real chat and credit processes on the real broker and database; the provider simulator is the only fake."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack
from tests.e2e.test_chat_flow import ChatSystem, start_system, use_settings

pytestmark = [pytest.mark.e2e]
PLATFORM_OPENAI = "sk-local-simulator-valid-platform-0001"


def chat_system(stack: Stack, tmp_path: Path, **chat_env: str) -> Iterator[ChatSystem]:
    yield from start_system(
        stack.kafka_bootstrap,
        stack.database_url,
        stack.database_schema,
        stack.topic_prefix,
        tmp_path / "logs",
        with_validation=False,
        **chat_env,
    )


@pytest.fixture
def system(stack: Stack, tmp_path: Path) -> Iterator[ChatSystem]:
    # A short lease, so a test sees that a call outliving it many times over is still billed.
    yield from chat_system(stack, tmp_path, LEASE_S="2", LEASE_RENEW_S="0.5")


def post(client: httpx.Client, key: str, message: str, feature: str = "chat", **kw) -> httpx.Response:
    return client.post("/chat", json={"feature": feature, "message": message}, headers={"Idempotency-Key": key}, **kw)


def stream(client: httpx.Client, key: str, message: str, stop_after: int | None = None, stop_after_s=None):
    """POST a streamed call and read its events: (deltas, (final event name, final data)). With
    `stop_after` the client goes away after that many deltas (the page's Stop); with `stop_after_s` once
    nothing came for that long."""
    deltas: list[str] = []
    final = (None, None)
    timeout = httpx.Timeout(30.0, read=stop_after_s) if stop_after_s else None
    try:
        with client.stream(
            "POST",
            "/chat",
            json={"message": message, "stream": True},
            headers={"Idempotency-Key": key},
            **({"timeout": timeout} if timeout else {}),
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
            name = None
            for line in r.iter_lines():
                if stop_after is not None and len(deltas) >= stop_after:
                    return deltas, ("gone", None)
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                    if name == "delta":
                        deltas.append(data["text"])
                    else:
                        final = (name, data)
    except httpx.ReadTimeout:
        return deltas, ("gone", None)
    return deltas, final


def outcome(client: httpx.Client, key: str, within_s: float = 30) -> dict:
    """The ended call's record from GET /api/calls/{key}, waiting while it runs."""
    deadline = time.monotonic() + within_s
    while True:
        r = client.get(f"/api/calls/{key}")
        assert r.status_code == 200, r.text
        if r.json()["state"] == "ended" or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.2)


def test_the_same_key_is_one_call_and_one_charge_and_another_body_is_refused(system: ChatSystem):
    system.grant("idem", "standard")  # 500
    client = system.client("idem")
    assert use_settings(client, "openai", "gpt-4o-mini").status_code == 200  # 3 credits a message
    key = str(uuid.uuid4())
    first = post(client, key, "hello once")
    assert first.status_code == 200 and first.json()["billing"]["charged"] is True, first.text
    again = post(client, key, "hello once")
    assert again.status_code == 200 and again.json() == first.json()  # the same answer and billing
    other = post(client, key, "another message")
    assert other.status_code == 422 and other.json()["error"] == "idempotency_key_reused", other.text
    # Without a key every request is a call of its own.
    assert post(client, str(uuid.uuid4()), "hello once").json()["event_id"] != first.json()["event_id"]
    assert system.wait_balance("idem", 494) == 494
    time.sleep(1.5)
    assert system.balance("idem") == 494  # two calls, two charges: the retry charged nothing
    assert client.get(f"/api/calls/{uuid.uuid4()}").status_code == 404


def test_a_retry_while_the_call_runs_attaches_to_it(system: ChatSystem):
    system.grant("attach", "standard")
    client = system.client("attach")
    assert use_settings(client, "openai", "gpt-4o-mini").status_code == 200
    system.sim.state.register(PLATFORM_OPENAI, "slow", delay_ms=3000)
    before = system.sim.state.calls(PLATFORM_OPENAI, "openai")
    key, answers = str(uuid.uuid4()), []
    threads = [threading.Thread(target=lambda: answers.append(post(client, key, "slow and retried"))) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert len({a.json()["event_id"] for a in answers}) == 1
    assert system.sim.state.calls(PLATFORM_OPENAI, "openai") == before + 1  # one provider call
    assert system.wait_balance("attach", 497) == 497
    time.sleep(1.5)
    assert system.balance("attach") == 497


def test_a_call_longer_than_the_lease_is_billed_and_shown_as_charged(system: ChatSystem):
    """Calls of minutes are normal: a pending event is published early only when its instance is gone,
    never because the call is slow (the lease here is 2 s, the call 7 s)."""
    system.grant("slowpoke", "standard")
    client = system.client("slowpoke")
    assert use_settings(client, "openai", "gpt-4o").status_code == 200  # 5 credits
    system.sim.state.register(PLATFORM_OPENAI, "slow", delay_ms=7000)
    r = post(client, str(uuid.uuid4()), "think for a while")
    assert r.status_code == 200 and r.json()["billing"]["charged"] is True and r.json()["ending"] == "completed"
    assert system.wait_balance("slowpoke", 495) == 495


def test_a_client_that_goes_away_from_a_plain_call_gets_its_answer_with_the_same_key(system: ChatSystem):
    system.grant("leaver", "standard")
    client = system.client("leaver")
    assert use_settings(client, "openai", "gpt-4o").status_code == 200
    system.sim.state.register(PLATFORM_OPENAI, "slow", delay_ms=4000)
    key = str(uuid.uuid4())
    with pytest.raises(httpx.ReadTimeout):
        post(client, key, "a deep question", timeout=1.0)
    assert client.get(f"/api/calls/{key}").json()["state"] == "running"
    ended = outcome(client, key)
    assert ended["status"] == 200 and ended["answer"]["billing"]["charged"] is True
    again = post(client, key, "a deep question")
    assert again.status_code == 200 and again.json()["event_id"] == ended["answer"]["event_id"]
    assert again.json()["reply"] and again.json()["reply"] == ended["answer"]["reply"]
    assert system.wait_balance("leaver", 495) == 495
    time.sleep(1.5)
    assert system.balance("leaver") == 495


def test_a_streamed_call_sends_its_text_as_it_comes_then_one_final_event(system: ChatSystem):
    system.grant("streamer", "standard")
    client = system.client("streamer")
    assert use_settings(client, "openai", "gpt-4o-mini").status_code == 200
    deltas, (name, done) = stream(client, str(uuid.uuid4()), "tell me about streams please")
    assert name == "done" and len(deltas) > 1, (name, done, deltas)
    assert "".join(deltas) == done["reply"] and done["billing"]["charged"] is True and done["ending"] == "completed"
    assert done["usage"]["output_tokens"] > 0
    assert system.wait_balance("streamer", 497) == 497


def test_stop_before_the_first_token_is_free_and_after_it_is_charged_once(system: ChatSystem):
    system.grant("stopper", "standard")  # 500
    client = system.client("stopper")
    assert use_settings(client, "openai", "gpt-4o").status_code == 200  # 5 credits
    # Before the first token: the provider is still thinking.
    system.sim.state.register(PLATFORM_OPENAI, "slow", delay_ms=4000)
    early = str(uuid.uuid4())
    deltas, (name, _) = stream(client, early, "stop me early", stop_after_s=1.0)
    assert deltas == [] and name == "gone"
    ended = outcome(client, early)
    assert ended["answer"]["ending"] == "stopped" and ended["answer"]["billing"]["charged"] is False, ended
    # After it: text has been shown, the provider worked on the platform's key.
    system.sim.state.register(PLATFORM_OPENAI, "stream_slow", delay_ms=300)
    late = str(uuid.uuid4())
    deltas, (name, _) = stream(client, late, "stop me once it has started", stop_after=2)
    assert len(deltas) == 2 and name == "gone"
    ended = outcome(client, late)
    answer = ended["answer"]
    assert answer["ending"] == "stopped" and answer["billing"]["charged"] is True and answer["billing"]["credits"] == 5
    assert answer["reply"].startswith("".join(deltas))  # the text so far is kept for a retry
    again = post(client, late, "stop me once it has started")
    assert again.json()["event_id"] == answer["event_id"] and again.json()["reply"] == answer["reply"]
    assert system.wait_balance("stopper", 495) == 495
    time.sleep(1.5)
    assert system.balance("stopper") == 495


def test_through_the_gateway_a_dropped_connection_and_a_stop_are_one_call_and_one_charge(system: ChatSystem):
    """The OpenAI-compatible gateway (answered by its short path in front of FastAPI) keeps the lifecycle:
    an SDK that times out of a plain call gets the same completion with the same Idempotency-Key, billed
    once; an SDK that closes a stream after its first chunks ends the call `stopped`, billed once."""
    import openai

    system.grant("gateway-user", "standard")  # 500
    client = system.client("gateway-user")

    def sdk(**kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=system.chat.url + "/v1", api_key=system.token("gateway-user"), max_retries=0, **kw
        )

    messages = [{"role": "user", "content": "a question that takes a while"}]
    system.sim.state.register(PLATFORM_OPENAI, "slow", delay_ms=4000)
    dropped = str(uuid.uuid4())
    with pytest.raises(openai.APITimeoutError):
        sdk(timeout=1.0).chat.completions.create(
            model="gpt-4o", messages=messages, extra_headers={"Idempotency-Key": dropped}
        )
    ended = outcome(client, dropped)
    assert ended["status"] == 200 and ended["answer"]["billing"]["charged"] is True, ended
    again = sdk().chat.completions.create(model="gpt-4o", messages=messages, extra_headers={"Idempotency-Key": dropped})
    assert again.choices[0].message.content == ended["answer"]["reply"]
    assert again.id == "chatcmpl-" + ended["answer"]["event_id"].replace("-", "")

    system.sim.state.register(PLATFORM_OPENAI, "stream_slow", delay_ms=300)
    stopped = str(uuid.uuid4())
    shown = []
    with sdk().chat.completions.create(
        model="gpt-4o", messages=messages, stream=True, extra_headers={"Idempotency-Key": stopped}
    ) as chunks:
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                shown.append(chunk.choices[0].delta.content)
            if len(shown) == 2:
                break  # the client goes away: leaving the block closes the connection
    answer = outcome(client, stopped)["answer"]
    assert answer["ending"] == "stopped" and answer["billing"]["charged"] is True, answer
    assert answer["reply"].startswith("".join(shown))
    assert system.wait_balance("gateway-user", 490) == 490  # 5 + 5, each call once
    time.sleep(1.5)
    assert system.balance("gateway-user") == 490


@pytest.mark.parametrize(
    "behaviour, delay_ms, ending",
    [("stream_fail", 0, "provider_error"), ("stream_stall", 8000, "timeout"), ("stream_cut", 0, "provider_error")],
)
def test_a_stream_that_fails_stalls_or_is_cut_after_its_first_token_is_never_billed(
    stack: Stack, tmp_path: Path, behaviour: str, delay_ms: int, ending: str
):
    for system in chat_system(stack, tmp_path, STREAM_IDLE_TIMEOUT_S="2"):
        system.grant("unlucky", "standard")
        client = system.client("unlucky")
        assert use_settings(client, "openai", "gpt-4o").status_code == 200
        system.sim.state.register(PLATFORM_OPENAI, behaviour, delay_ms=delay_ms)
        deltas, (name, data) = stream(client, str(uuid.uuid4()), "this will not end well")
        assert deltas and name == "error", (deltas, name, data)  # some text came first
        assert data["ending"] == ending and data["charged"] is False and data["message"], data
        # A provider that fails before the first token is the same: an error, nothing charged.
        system.sim.state.register(PLATFORM_OPENAI, "down")
        deltas, (name, data) = stream(client, str(uuid.uuid4()), "and this one not at all")
        assert deltas == [] and name == "error" and data["charged"] is False and data["ending"] == "provider_error"
        time.sleep(2)
        assert system.balance("unlucky") == 500


def test_a_chat_instance_killed_mid_stream_ends_the_call_interrupted_and_free(stack: Stack, tmp_path: Path):
    for system in chat_system(stack, tmp_path, LEASE_S="2", LEASE_RENEW_S="0.5"):
        system.grant("victim", "standard")
        client = system.client("victim")
        assert use_settings(client, "openai", "gpt-4o").status_code == 200
        system.sim.state.register(PLATFORM_OPENAI, "stream_slow", delay_ms=400)
        key, seen = str(uuid.uuid4()), []

        def read(client=client, key=key, seen=seen) -> None:
            try:
                seen.append(stream(client, key, "killed halfway"))
            except (httpx.HTTPError, AssertionError) as exc:
                seen.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 10
        while client.get(f"/api/calls/{key}").json().get("state") != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # some text has been streamed
        system.chat.kill()
        reader.join(30)
        assert seen and (not isinstance(seen[0], tuple) or seen[0][1] == (None, None)), seen  # no final event
        system.chat.start()  # a new instance, a new lease; the dead one's lapses
        client = system.client("victim")
        ended = outcome(client, key, within_s=30)
        assert ended["state"] == "ended" and ended["status"] == 503, ended
        assert ended["answer"]["ending"] == "interrupted" and ended["answer"]["charged"] is False
        retry = post(client, key, "killed halfway")
        assert retry.status_code == 503 and retry.json()["error"] == "interrupted"
        time.sleep(2)
        assert system.balance("victim") == 500
