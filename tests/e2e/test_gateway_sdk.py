"""The OpenAI-compatible gateway through clients nobody here wrote: the official `openai` SDK (sync and
async, plain and streaming, every error class) on the real stack (chat and credits on the real broker
and database; the provider simulator as the providers)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.test_chat_flow import ChatSystem, start_system

pytestmark = [pytest.mark.e2e]
PLATFORM_OPENAI = "sk-local-simulator-valid-platform-0001"
OWN_ANTHROPIC = "sk-ant-api03-valid-gateway" + "z" * 20


@pytest.fixture(scope="module")
def system(kafka_bootstrap: str, database_url: str, tmp_path_factory) -> Iterator[ChatSystem]:
    from tests.conftest import unique_name
    from tests.e2e.test_page_browser import _cleanup, _prepare

    schema, prefix = unique_name("test_"), unique_name() + "."
    asyncio.run(_prepare(kafka_bootstrap, database_url, schema, prefix))
    try:
        yield from start_system(
            kafka_bootstrap, database_url, schema, prefix, tmp_path_factory.mktemp("logs"), with_validation=False
        )
    finally:
        asyncio.run(_cleanup(kafka_bootstrap, database_url, schema, prefix))


def sdk(system: ChatSystem, user: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=system.chat.url + "/v1", api_key=system.token(user), max_retries=0, **kw)


def user_with(system: ChatSystem, plan: str | None = "standard") -> str:
    user = f"gw-{uuid.uuid4().hex[:8]}"
    if plan:
        system.grant(user, plan)
    return user


def test_a_plain_call_on_platform_credits_carries_its_billing(system: ChatSystem):
    user = user_with(system)
    client = sdk(system, user)
    done = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello from the SDK"}]
    )
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert "Hello from the SDK" in done.choices[0].message.content and done.choices[0].finish_reason == "stop"
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    billing = done.model_extra["billing"]
    assert billing["key_source"] == "platform" and billing["charged"] is True and billing["credits"] == 3
    assert billing["balance_after"] == 497
    assert system.wait_balance(user, 497) == 497
    listed = client.models.list()
    ids = {m.id: m.owned_by for m in listed.data}
    assert ids["gpt-4o-mini"] == "openai" and ids["claude-3-5-haiku"] == "anthropic" and "gemini-2.5-pro" in ids


def test_every_provider_streams_in_openai_chunks_with_usage_and_billing_at_the_end(system: ChatSystem):
    user = user_with(system)
    client = sdk(system, user)
    for model, credits in [("gpt-4o-mini", 3), ("claude-3-5-haiku", 1), ("gemini-2.5-pro", 5), ("llama3-8b-8192", 1)]:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"stream {model}"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage, billing, finish, seen = [], None, None, None, []
        for chunk in stream:
            seen.append(chunk)
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
                billing = (chunk.model_extra or {}).get("billing") or billing
            if chunk.usage:
                usage = chunk.usage
        text = "".join(pieces)
        assert f"stream {model}" in text and finish == "stop", (model, text)
        assert len({c.id for c in seen}) == 1 and seen[0].id.startswith("chatcmpl-"), [c.id for c in seen]
        assert {c.model for c in seen} == {model}
        assert usage is not None and usage.completion_tokens > 0, model
        assert billing["charged"] is True and billing["credits"] == credits, (model, billing)


def test_the_users_own_key_per_request_costs_nothing_and_is_never_echoed(system: ChatSystem):
    user = user_with(system, plan=None)  # no credits at all
    client = sdk(system, user, default_headers={"X-Provider-Key": OWN_ANTHROPIC})
    raw = client.chat.completions.with_raw_response.create(
        model="claude-3-5-haiku", messages=[{"role": "user", "content": "on my own key"}]
    )
    done = raw.parse()
    assert done.model_extra["billing"]["key_source"] == "byok" and done.model_extra["billing"]["charged"] is False
    assert OWN_ANTHROPIC not in raw.http_response.text and OWN_ANTHROPIC[-12:] not in raw.http_response.text
    assert system.sim.state.calls(OWN_ANTHROPIC, "anthropic") == 1  # the call ran on that key
    # The same request without the key runs on platform credits, which this user has not got: 402.
    with pytest.raises(openai.APIStatusError) as refused:
        sdk(system, user).chat.completions.create(model="claude-3-5-haiku", messages=[{"role": "user", "content": "x"}])
    assert refused.value.status_code == 402 and "credits" in refused.value.message
    assert "own api key" in refused.value.message.lower()
    # The user's own key refused by its provider: PermissionDeniedError, or RateLimitError, with its sentence.
    for behaviour, error in [("revoked", openai.PermissionDeniedError), ("rate_limited", openai.RateLimitError)]:
        system.sim.state.register(OWN_ANTHROPIC, behaviour)
        with pytest.raises(error) as refused_key:
            client.chat.completions.create(model="claude-3-5-haiku", messages=[{"role": "user", "content": "x"}])
        assert "Anthropic" in refused_key.value.message and refused_key.value.body["billing"]["charged"] is False
    # BYOK switched on in the settings and no key for the provider: refused (409), never billed instead.
    settings = {"provider": "openai", "model": "gpt-4o", "use_own_key": True}
    web = system.client(user)
    assert web.post("/settings/model", json=settings).status_code == 200
    with pytest.raises(openai.ConflictError) as paused:
        sdk(system, user).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "own" in paused.value.message and paused.value.body["code"] == "own_key_missing"


def test_errors_are_the_sdks_own_classes_with_a_sentence(system: ChatSystem):
    user = user_with(system, plan="free")  # 50 credits
    client = sdk(system, user)
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        (
            openai.AuthenticationError,
            lambda: openai.OpenAI(
                base_url=system.chat.url + "/v1", api_key="not-a-token", max_retries=0
            ).chat.completions.create(model="gpt-4o-mini", messages=msg),
        ),
        (openai.NotFoundError, lambda: client.chat.completions.create(model="no-such-model-9", messages=msg)),
        (openai.UnprocessableEntityError, lambda: client.chat.completions.create(model="gpt-4o-mini", messages=[])),
        (
            openai.UnprocessableEntityError,
            lambda: client.chat.completions.create(
                model="gpt-4o-mini", messages=msg, extra_headers={"X-Provider-Key": "sk-ant-api03-valid" + "q" * 20}
            ),
        ),  # an Anthropic key for an OpenAI model
        (
            openai.UnprocessableEntityError,
            lambda: client.chat.completions.create(
                model="gpt-4o-mini", messages=msg, extra_headers={"X-Feature": "poetry"}
            ),
        ),
        (
            openai.APIStatusError,
            lambda: client.chat.completions.create(model="gpt-5.2-pro", messages=msg),
        ),  # 50 credits a call: costs exactly what the user has, so one more is 402 below
    ]
    seen = []
    for expected, call in cases:
        try:
            call()
            seen.append("ok")
        except openai.APIStatusError as exc:
            assert isinstance(exc, expected), (expected, exc)
            assert exc.message and exc.body["code"], exc.body
            seen.append(exc.status_code)
    assert seen == [401, 404, 422, 422, 422, "ok"], seen
    with pytest.raises(openai.APIStatusError) as short:
        client.chat.completions.create(model="gpt-4o-mini", messages=msg)
    assert short.value.status_code == 402 and short.value.body["code"] == "payment_required"
    # A provider that fails: 502, never billed, in the SDK's class for it.
    system.sim.state.register(PLATFORM_OPENAI, "down")
    try:
        rich = user_with(system)
        with pytest.raises(openai.InternalServerError) as failed:
            sdk(system, rich).chat.completions.create(model="gpt-4o-mini", messages=msg)
        assert failed.value.status_code == 502 and failed.value.body["billing"]["charged"] is False
        # A stream that breaks after its first chunk: the SDK raises on the error chunk.
        system.sim.state.register(PLATFORM_OPENAI, "stream_fail")
        with pytest.raises(openai.APIError):
            for _ in sdk(system, rich).chat.completions.create(model="gpt-4o-mini", messages=msg, stream=True):
                pass
        time.sleep(1.5)
        assert system.balance(rich) == 500
    finally:
        system.sim.state.register(PLATFORM_OPENAI, "valid")


def test_always_billed_features_run_on_their_platform_model_and_the_same_key_is_one_call(system: ChatSystem):
    user = user_with(system)
    client = sdk(system, user, default_headers={"X-Provider-Key": "sk-proj-valid-own" + "k" * 20})
    key = str(uuid.uuid4())
    headers = {"X-Feature": "code_fix", "Idempotency-Key": key}
    first = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "fix it"}], extra_headers=headers
    )
    again = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "fix it"}], extra_headers=headers
    )
    assert first.model == "gpt-4.1-mini" and first.model_extra["billing"]["key_source"] == "platform"
    assert first.id == again.id and first.model_extra["billing"]["credits"] == 1
    streamed = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "fix it, streamed"}],
        extra_headers={"X-Feature": "code_fix"},
        stream=True,
    )
    assert {c.model for c in streamed} == {"gpt-4.1-mini"}  # the model that ran, on every chunk
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "another"}], extra_headers=headers
        )
    assert system.wait_balance(user, 498) == 498  # the fix and the streamed fix: 1 credit each
    time.sleep(1.5)
    assert system.balance(user) == 498


def test_the_async_client_streams_too(system: ChatSystem):
    user = user_with(system)

    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=system.chat.url + "/v1", api_key=system.token(user), max_retries=0)
        async with client:
            stream = await client.chat.completions.create(
                model="llama-3.3-70b-versatile", messages=[{"role": "user", "content": "async stream"}], stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert "async stream" in asyncio.run(run())
    assert system.wait_balance(user, 495) == 495
    r = httpx.get(system.chat.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_the_shared_edges_refusals_come_in_openais_shape_too(system: ChatSystem):
    token = {"Authorization": f"Bearer {system.token(user_with(system))}", "Content-Type": "application/json"}
    url = system.chat.url + "/v1/chat/completions"
    big = httpx.post(url, content=b'{"model": "gpt-4o-mini", "messages": [' + b" " * 70_000 + b"]}", headers=token)
    unreadable = httpx.post(url, content=b'{"model": "gpt-4o-mini", "messages": [', headers=token)
    for r, status in [(big, 413), (unreadable, 422)]:
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"] and error["code"], error
    with pytest.raises(openai.APIStatusError) as too_big:
        sdk(system, user_with(system)).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 70_000}]
        )
    assert too_big.value.status_code == 413 and "KiB" in too_big.value.message
