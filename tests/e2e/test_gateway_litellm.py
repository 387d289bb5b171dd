"""The OpenAI-compatible gateway through LiteLLM's Python SDK, the way the product's backend calls models:
`litellm.completion(model="openai/<model>", api_base=<chat>/v1, api_key=<the user's token>, ...)`, plain,
streamed and async, a model of another provider, the user's own key (`X-Provider-Key`) billed as BYOK,
and refusals arriving as LiteLLM's own exception classes. The real stack: chat and credits on the real
broker and database; the provider simulator as the providers.

LiteLLM offline: it fetches its model cost map from the internet when imported unless
`LITELLM_LOCAL_MODEL_COST_MAP=True` (then it reads the copy it ships), and it counts tokens with the
tiktoken encodings it ships (it points `TIKTOKEN_CACHE_DIR` at them itself); `HF_HUB_OFFLINE=1` keeps
the Hugging Face tokenizers it can load for other models off the network too. The module imports
LiteLLM with those set and, while each test runs, refuses and records every host name looked up that
is not this machine's loopback: a test fails if LiteLLM tried to reach anything else.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pytest

from tests.e2e.test_chat_flow import ChatSystem, start_system

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
OFFLINE_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
OWN_ANTHROPIC = "sk-ant-api03-valid-litellm" + "w" * 20
PLATFORM_OPENAI = "sk-local-simulator-valid-platform-0001"  # the simulator's (tests/e2e/test_gateway_sdk.py)
OWN_OPENAI = "sk-proj-valid-litellm-own" + "v" * 20
CALL = {"num_retries": 0, "timeout": 30}  # no retry hides a refusal; no call waits forever
HELLO = [{"role": "user", "content": "Hello from LiteLLM"}]


@contextmanager
def loopback_only(asked: list[str]) -> Iterator[None]:
    """Host names other than loopback are refused (and recorded in `asked`) while inside."""
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in LOOPBACK:
            asked.append(name)
            raise socket.gaierror(socket.EAI_NONAME, f"offline test: {name} is not looked up")
        return real(host, *args, **kwargs)

    socket.getaddrinfo = guarded
    try:
        yield
    finally:
        socket.getaddrinfo = real


@pytest.fixture(scope="module")
def litellm() -> ModuleType:
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    asked: list[str] = []
    with loopback_only(asked):
        module = importlib.import_module("litellm")
    assert asked == [], f"importing LiteLLM looked up {asked}"
    assert module.model_cost.get("gpt-4o-mini"), "LiteLLM's own copy of its model cost map was not loaded"
    module.suppress_debug_info = True  # its 'Give Feedback' banner on every exception
    module.telemetry = False
    return module


@pytest.fixture(autouse=True)
def offline(litellm: ModuleType) -> Iterator[None]:
    asked: list[str] = []
    with loopback_only(asked):
        yield
    assert asked == [], f"LiteLLM tried to reach {sorted(set(asked))}"


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


def user_with(system: ChatSystem, plan: str | None = "standard") -> str:
    user = f"ll-{uuid.uuid4().hex[:8]}"
    if plan:
        system.grant(user, plan)
    return user


def gateway(system: ChatSystem, user: str) -> dict[str, Any]:
    """What the backend passes LiteLLM to reach a model through our gateway as `user`."""
    return {"api_base": system.chat.url + "/v1", "api_key": system.token(user), **CALL}


def streamed(chunks: Any) -> tuple[list[Any], str, str | None, Any, dict[str, Any] | None]:
    """A LiteLLM stream read to its end: the chunks, the text, the finish reason, the usage, `billing`."""
    seen, pieces, finish, usage, billing = [], [], None, None, None
    for chunk in chunks:
        seen.append(chunk)
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = getattr(chunk, "usage", None) or usage
        billing = getattr(chunk, "billing", None) or billing
    return seen, "".join(pieces), finish, usage, billing


def test_a_plain_completion_comes_back_with_usage_and_its_billing(system: ChatSystem, litellm: ModuleType):
    user = user_with(system)
    done = litellm.completion(model="openai/gpt-4o-mini", messages=HELLO, **gateway(system, user))
    assert isinstance(done, litellm.ModelResponse) and done.id.startswith("chatcmpl-")
    assert "Hello from LiteLLM" in done.choices[0].message.content and done.choices[0].finish_reason == "stop"
    assert done.choices[0].message.role == "assistant" and done.model == "gpt-4o-mini"
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    # LiteLLM keeps the gateway's extra top-level field on its ModelResponse.
    assert done.billing["key_source"] == "platform" and done.billing["charged"] is True
    assert done.billing["credits"] == 3 and done.billing["balance_after"] == 497
    assert done._hidden_params["custom_llm_provider"] == "openai"
    assert done._hidden_params["api_base"] == system.chat.url + "/v1"
    assert system.wait_balance(user, 497) == 497


def test_a_stream_assembles_into_the_answer_with_usage_and_billing_on_the_finish_chunk(
    system: ChatSystem, litellm: ModuleType
):
    user = user_with(system)
    chunks, text, finish, usage, billing = streamed(
        litellm.completion(
            model="openai/gpt-4o-mini",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "stream through LiteLLM"},
            ],
            stream=True,
            stream_options={"include_usage": True},
            **gateway(system, user),
        )
    )
    assert "stream through LiteLLM" in text and finish == "stop", text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it came in pieces
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert billing == {**billing, "key_source": "platform", "charged": True, "credits": 3, "balance_after": 497}
    # LiteLLM's own assembly of the chunks gives the same answer and usage.
    built = litellm.stream_chunk_builder(chunks, messages=[{"role": "user", "content": "stream through LiteLLM"}])
    assert built.choices[0].message.content == text and built.usage.completion_tokens == usage.completion_tokens
    assert system.wait_balance(user, 497) == 497


def test_the_async_client_once(system: ChatSystem, litellm: ModuleType):
    user = user_with(system)

    async def call() -> Any:
        return await asyncio.wait_for(
            litellm.acompletion(
                model="openai/llama-3.3-70b-versatile",
                messages=[{"role": "user", "content": "async through LiteLLM"}],
                **gateway(system, user),
            ),
            timeout=45,
        )

    done = asyncio.run(call())
    assert "async through LiteLLM" in done.choices[0].message.content and done.model == "llama-3.3-70b-versatile"
    assert done.billing["charged"] is True and done.billing["credits"] == 5
    assert system.wait_balance(user, 495) == 495


def test_models_of_other_providers_through_the_same_openai_route(system: ChatSystem, litellm: ModuleType):
    user = user_with(system)
    # Anthropic, translated by the gateway: plain.
    done = litellm.completion(
        model="openai/claude-3-5-haiku", messages=[{"role": "user", "content": "to Claude"}], **gateway(system, user)
    )
    assert "[claude-3-5-haiku simulated]" in done.choices[0].message.content and "to Claude" in (
        done.choices[0].message.content
    )
    assert done.model == "claude-3-5-haiku" and done.billing["credits"] == 1 and done.usage.completion_tokens > 0
    # Gemini, translated by the gateway: streamed, with usage.
    _, text, finish, usage, billing = streamed(
        litellm.completion(
            model="openai/gemini-2.5-pro",
            messages=[{"role": "user", "content": "to Gemini"}],
            stream=True,
            stream_options={"include_usage": True},
            **gateway(system, user),
        )
    )
    assert "to Gemini" in text and finish == "stop" and usage.completion_tokens > 0, text
    assert billing["credits"] == 5 and billing["key_source"] == "platform"
    assert system.wait_balance(user, 494) == 494


def test_the_users_own_key_per_call_is_billed_as_byok_and_costs_nothing(system: ChatSystem, litellm: ModuleType):
    user = user_with(system)  # 500 credits, which BYOK calls must not touch
    own = {"extra_headers": {"X-Provider-Key": OWN_ANTHROPIC}}
    done = litellm.completion(
        model="openai/claude-3-5-haiku",
        messages=[{"role": "user", "content": "on my key"}],
        **gateway(system, user),
        **own,
    )
    assert "on my key" in done.choices[0].message.content
    assert done.billing == {**done.billing, "key_source": "byok", "charged": False, "credits": 0}
    _, text, finish, _, billing = streamed(
        litellm.completion(
            model="openai/claude-3-5-haiku",
            messages=[{"role": "user", "content": "streamed on my key"}],
            stream=True,
            **gateway(system, user),
            **own,
        )
    )
    assert "streamed on my key" in text and finish == "stop" and billing["key_source"] == "byok", billing
    assert billing["charged"] is False
    assert system.sim.state.calls(OWN_ANTHROPIC, "anthropic") == 2  # both ran on the user's key
    # The key never comes back: not in the answer, not in what LiteLLM kept of the response's headers.
    assert OWN_ANTHROPIC not in done.model_dump_json() and OWN_ANTHROPIC not in repr(done._hidden_params)
    assert OWN_ANTHROPIC[-12:] not in done.model_dump_json()
    # The ledger: a platform call after the two BYOK calls (same user, so the same partition, in order)
    # is the only debit once it is decided.
    after = litellm.completion(model="openai/claude-3-5-haiku", messages=HELLO, **gateway(system, user))
    assert after.billing["key_source"] == "platform" and after.billing["credits"] == 1
    assert system.wait_balance(user, 499) == 499
    time.sleep(1.0)
    assert system.balance(user) == 499


def test_refusals_arrive_as_litellms_own_exception_classes_with_the_sentence(system: ChatSystem, litellm: ModuleType):
    broke = user_with(system, plan=None)  # no credits at all
    asked_before = system.sim.state.calls(PLATFORM_OPENAI, "openai")
    for stream in (False, True):
        with pytest.raises(litellm.exceptions.APIError) as short:
            reply = litellm.completion(
                model="openai/gpt-4o-mini", messages=HELLO, stream=stream, **gateway(system, broke)
            )
            streamed(reply)
        assert short.value.status_code == 402, (stream, short.value)
        assert "costs 3 credits and you have 0 available" in str(short.value), str(short.value)
        assert "own API key" in short.value.message
    assert system.sim.state.calls(PLATFORM_OPENAI, "openai") == asked_before  # refused before the provider
    # The other refusals, each in the class LiteLLM maps its status to (for an OpenAI-compatible server
    # LiteLLM has no class of its own for 402, 403 and 409: they come as its APIError, with the status).
    rich = user_with(system)
    own = {"extra_headers": {"X-Provider-Key": OWN_OPENAI}}
    cases = [
        ("not a token", litellm.AuthenticationError, 401, {"api_key": "nope"}, "openai/gpt-4o-mini", None),
        ("unknown model", litellm.NotFoundError, 404, {}, "openai/no-such-model-9", None),
        ("unknown feature", litellm.BadRequestError, 422, {"extra_headers": {"X-Feature": "poetry"}}, None, None),
        ("own key revoked", litellm.exceptions.APIError, 403, own, None, "revoked"),
        ("own key rate limited", litellm.RateLimitError, 429, own, None, "rate_limited"),
        ("provider down", litellm.BadGatewayError, 502, own, None, "down"),
    ]
    for case, error, status, extra, model, behaviour in cases:
        if behaviour:
            system.sim.state.register(OWN_OPENAI, behaviour)
        with pytest.raises(error) as refused:
            litellm.completion(
                model=model or "openai/gpt-4o-mini", messages=HELLO, **{**gateway(system, rich), **extra}
            )
        assert refused.value.status_code == status, (case, refused.value)
        sentence = str(refused.value).split("OpenAIException - ", 1)[-1]
        assert len(sentence) > 20 and sentence[0].isupper(), (case, str(refused.value))
        if behaviour:
            assert "OpenAI" in sentence and OWN_OPENAI not in sentence, (case, sentence)
    time.sleep(1.0)
    assert system.balance(rich) == 500  # nothing refused was charged
