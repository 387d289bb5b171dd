"""The official SDKs (openai, anthropic, groq, google-genai) as clients of the provider simulator: it
must accept what each current SDK sends and answer in shapes the SDK parses, its errors landing in
the SDK's own error classes. The simulator runs as a real server on a free port (the SDKs bring their
own HTTP clients); every client has a short timeout and no retries, so nothing here can hang or wait
out a Retry-After.
"""

from __future__ import annotations

import anthropic
import groq
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors, types as genai_types

from schemas.events import Provider
from services.provider_simulator import SimulatorServer
from tests.support import SIM_KEY_SHAPES

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

TIMEOUT_S = 10
ASKED = "hello there, how many tokens is this question?"
MESSAGES = [{"role": "user", "content": ASKED}]


def key(provider: Provider, marker: str) -> str:
    return SIM_KEY_SHAPES[provider].format(marker)


@pytest.fixture(scope="module")
def sim():
    with SimulatorServer() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(sim):
    sim.state.reset()


# --- clients, as an application would make them (only the base URL points at the simulator) ---


def openai_client(sim, marker: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=key(Provider.OPENAI, marker), base_url=sim.env()["OPENAI_BASE_URL"], max_retries=0, timeout=TIMEOUT_S
    )


def async_openai_client(sim, marker: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key(Provider.OPENAI, marker), base_url=sim.env()["OPENAI_BASE_URL"], max_retries=0, timeout=TIMEOUT_S
    )


def groq_client(sim, marker: str) -> groq.Groq:
    return groq.Groq(
        api_key=key(Provider.GROQ, marker), base_url=sim.env()["GROQ_BASE_URL"], max_retries=0, timeout=TIMEOUT_S
    )


def anthropic_client(sim, marker: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=key(Provider.ANTHROPIC, marker),
        base_url=sim.env()["ANTHROPIC_BASE_URL"],
        max_retries=0,
        timeout=TIMEOUT_S,
    )


def async_anthropic_client(sim, marker: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key=key(Provider.ANTHROPIC, marker),
        base_url=sim.env()["ANTHROPIC_BASE_URL"],
        max_retries=0,
        timeout=TIMEOUT_S,
    )


def gemini_client(sim, marker: str) -> genai.Client:
    # google-genai retries nothing unless told to; its timeout is in milliseconds.
    return genai.Client(
        api_key=key(Provider.GEMINI, marker),
        http_options=genai_types.HttpOptions(base_url=sim.env()["GEMINI_BASE_URL"], timeout=TIMEOUT_S * 1000),
    )


# --- plain calls and model lists ---


def test_openai_sync_chat_and_models(sim):
    client = openai_client(sim, "valid")
    reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "hello there" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert "gpt-4o" in [m.id for m in client.models.list()]
    assert sim.state.calls(key(Provider.OPENAI, "valid"), "openai") == 2


async def test_openai_async_chat_and_models(sim):
    async with async_openai_client(sim, "valid") as client:
        reply = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        models = [m.id async for m in client.models.list()]
    assert "hello there" in reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert "gpt-4o-mini" in models


def test_groq_chat_and_models(sim):
    client = groq_client(sim, "valid")
    reply = client.chat.completions.create(model="llama3-8b-8192", messages=MESSAGES)
    assert "hello there" in reply.choices[0].message.content and reply.usage.prompt_tokens > 0
    assert "llama3-8b-8192" in [m.id for m in client.models.list().data]


def test_anthropic_chat_and_models_with_the_key_as_the_sdk_sends_it(sim):
    client = anthropic_client(sim, "valid")
    reply = client.messages.create(model="claude-sonnet-4", max_tokens=100, messages=MESSAGES)
    assert "hello there" in reply.content[0].text
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
    assert reply.stop_reason == "end_turn"
    assert "claude-sonnet-4" in [m.id for m in client.models.list()]
    # The current SDK sends the key as a bearer token and its own (newer) anthropic-version; both
    # got through, and the calls were counted against the key.
    assert sim.state.calls(key(Provider.ANTHROPIC, "valid"), "anthropic") == 2


async def test_anthropic_async_chat(sim):
    async with async_anthropic_client(sim, "valid") as client:
        reply = await client.messages.create(model="claude-3-5-haiku", max_tokens=100, messages=MESSAGES)
    assert "hello there" in reply.content[0].text


def test_gemini_chat_and_models_on_the_sdks_default_api_version(sim):
    client = gemini_client(sim, "valid")
    reply = client.models.generate_content(model="gemini-2.5-flash", contents=ASKED)
    assert "hello there" in reply.text
    assert reply.usage_metadata.prompt_token_count > 0 and reply.usage_metadata.candidates_token_count > 0
    assert "models/gemini-2.5-pro" in [m.name for m in client.models.list()]
    assert sim.state.endpoints() == {"gemini chat": 1, "gemini models": 1}


async def test_gemini_async_chat_on_v1beta_too(sim):
    client = genai.Client(
        api_key=key(Provider.GEMINI, "valid"),
        http_options=genai_types.HttpOptions(
            base_url=sim.env()["GEMINI_BASE_URL"], api_version="v1beta", timeout=TIMEOUT_S * 1000
        ),
    )
    reply = await client.aio.models.generate_content(model="gemini-2.5-pro", contents=ASKED)
    assert "hello there" in reply.text


# --- streams: the text assembled from the deltas, the usage read where each SDK reads it ---


def test_openai_stream_with_usage_in_a_last_chunk(sim):
    stream = openai_client(sim, "valid").chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "hello there" in text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert sim.state.endpoints() == {"openai stream": 1}


async def test_openai_async_stream_without_include_usage_carries_no_usage(sim):
    async with async_openai_client(sim, "valid") as client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
    assert "hello there" in "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_openai_stream_helper_assembles_the_completion(sim):
    client = openai_client(sim, "valid")
    with client.chat.completions.stream(
        model="gpt-4o", messages=MESSAGES, stream_options={"include_usage": True}
    ) as stream:
        for _ in stream:
            pass
        completion = stream.get_final_completion()
    assert "hello there" in completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0


def test_groq_stream_usage_in_x_groq_and_with_include_usage(sim):
    client = groq_client(sim, "valid")
    chunks = list(client.chat.completions.create(model="llama3-8b-8192", messages=MESSAGES, stream=True))
    assert "hello there" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.x_groq.usage.completion_tokens > 0 and last.x_groq.usage.prompt_tokens > 0
    assert chunks[0].x_groq.id == last.x_groq.id
    # This SDK has no `stream_options` parameter; the API takes it (and providers/groq.py sends it).
    with_usage = list(
        client.chat.completions.create(
            model="llama3-8b-8192",
            messages=MESSAGES,
            stream=True,
            extra_body={"stream_options": {"include_usage": True}},
        )
    )
    assert (
        with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == last.x_groq.usage.completion_tokens
    )


def test_anthropic_stream_events_and_the_sdks_message_stream(sim):
    client = anthropic_client(sim, "valid")
    events = list(client.messages.create(model="claude-sonnet-4", max_tokens=100, messages=MESSAGES, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") > 3  # the SDK drops `ping` itself
    assert events[0].message.usage.input_tokens > 0
    assert events[-2].usage.output_tokens > 0 and events[-2].delta.stop_reason == "end_turn"
    with client.messages.stream(model="claude-sonnet-4", max_tokens=100, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "hello there" in text and final.content[0].text == text
    assert final.usage.input_tokens == events[0].message.usage.input_tokens
    assert final.usage.output_tokens == events[-2].usage.output_tokens


async def test_anthropic_async_message_stream(sim):
    async with async_anthropic_client(sim, "valid") as client:
        async with client.messages.stream(model="claude-sonnet-4", max_tokens=100, messages=MESSAGES) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert "hello there" in text and final.usage.output_tokens > 0


def test_gemini_stream_usage_in_the_last_chunk(sim):
    client = gemini_client(sim, "valid")  # held: a genai.Client closes its HTTP client when collected
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents=ASKED))
    assert len(chunks) > 3
    assert "hello there" in "".join(c.text or "" for c in chunks)
    last = chunks[-1]
    assert last.candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert last.usage_metadata.prompt_token_count > 0 and last.usage_metadata.candidates_token_count > 0
    assert sim.state.endpoints() == {"gemini stream": 1}


async def test_gemini_async_stream(sim):
    client = gemini_client(sim, "valid")
    stream = await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents=ASKED)
    chunks = [c async for c in stream]
    assert "hello there" in "".join(c.text or "" for c in chunks)
    assert chunks[-1].usage_metadata.candidates_token_count > 0


# --- errors: each behaviour in the SDK's own error class ---

OPENAI_LIKE_ERRORS = {
    "invalid": ("AuthenticationError", 401, "invalid_api_key"),
    "revoked": ("AuthenticationError", 401, "account_deactivated"),
    "denied": ("PermissionDeniedError", 403, None),
    "noquota": ("RateLimitError", 429, "insufficient_quota"),
    "ratelimited": ("RateLimitError", 429, "rate_limit_exceeded"),
    "down": ("InternalServerError", 503, None),
}


@pytest.mark.parametrize("marker", list(OPENAI_LIKE_ERRORS))
def test_openai_errors_are_the_sdks_classes(sim, marker):
    name, status, code = OPENAI_LIKE_ERRORS[marker]
    client = openai_client(sim, marker)
    for call in (
        lambda: client.chat.completions.create(model="gpt-4o", messages=MESSAGES),
        lambda: client.models.list(),
        lambda: list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)),
    ):
        with pytest.raises(getattr(openai, name)) as caught:
            call()
        assert caught.value.status_code == status
        if code:
            assert caught.value.code == code
        if marker == "ratelimited":
            assert caught.value.response.headers["retry-after"] == "20"


@pytest.mark.parametrize("marker", ["invalid", "ratelimited", "down"])
async def test_openai_async_errors_are_the_sdks_classes(sim, marker):
    name, status, _ = OPENAI_LIKE_ERRORS[marker]
    async with async_openai_client(sim, marker) as client:
        with pytest.raises(getattr(openai, name)) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == status


@pytest.mark.parametrize("marker", list(OPENAI_LIKE_ERRORS))
def test_groq_errors_are_the_sdks_classes(sim, marker):
    name, status, code = OPENAI_LIKE_ERRORS[marker]
    client = groq_client(sim, marker)
    with pytest.raises(getattr(groq, name)) as caught:
        client.chat.completions.create(model="llama3-8b-8192", messages=MESSAGES)
    assert caught.value.status_code == status
    if marker == "ratelimited":
        assert caught.value.response.headers["retry-after"] == "20"
    with pytest.raises(getattr(groq, name)):
        client.models.list()


ANTHROPIC_ERRORS = {
    "invalid": (anthropic.AuthenticationError, 401, "authentication_error"),
    "revoked": (anthropic.AuthenticationError, 401, "authentication_error"),
    "denied": (anthropic.PermissionDeniedError, 403, "permission_error"),
    "noquota": (anthropic.BadRequestError, 400, "invalid_request_error"),  # "credit balance is too low"
    "ratelimited": (anthropic.RateLimitError, 429, "rate_limit_error"),
    "down": (anthropic.OverloadedError, 529, "overloaded_error"),
}


@pytest.mark.parametrize("marker", list(ANTHROPIC_ERRORS))
def test_anthropic_errors_are_the_sdks_classes(sim, marker):
    cls, status, kind = ANTHROPIC_ERRORS[marker]
    client = anthropic_client(sim, marker)
    for call in (
        lambda: client.messages.create(model="claude-sonnet-4", max_tokens=10, messages=MESSAGES),
        lambda: list(client.models.list()),
        lambda: list(client.messages.create(model="claude-sonnet-4", max_tokens=10, messages=MESSAGES, stream=True)),
    ):
        with pytest.raises(cls) as caught:
            call()
        assert caught.value.status_code == status and caught.value.type == kind
        if marker == "ratelimited":
            assert caught.value.response.headers["retry-after"] == "15"


async def test_anthropic_async_error_is_the_sdks_class(sim):
    async with async_anthropic_client(sim, "revoked") as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await client.messages.create(model="claude-sonnet-4", max_tokens=10, messages=MESSAGES)
    assert "disabled" in caught.value.api_message


def test_anthropic_refuses_an_anthropic_version_that_is_no_date(sim):
    client = anthropic_client(sim, "valid").with_options(default_headers={"anthropic-version": "latest"})
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude-sonnet-4", max_tokens=10, messages=MESSAGES)


GEMINI_ERRORS = {
    "invalid": (genai_errors.ClientError, 400, "INVALID_ARGUMENT"),
    "revoked": (genai_errors.ClientError, 400, "INVALID_ARGUMENT"),
    "denied": (genai_errors.ClientError, 403, "PERMISSION_DENIED"),
    "noquota": (genai_errors.ClientError, 429, "RESOURCE_EXHAUSTED"),
    "ratelimited": (genai_errors.ClientError, 429, "RESOURCE_EXHAUSTED"),
    "down": (genai_errors.ServerError, 503, "UNAVAILABLE"),
}


@pytest.mark.parametrize("marker", list(GEMINI_ERRORS))
def test_gemini_errors_are_the_sdks_classes(sim, marker):
    cls, status, grpc_status = GEMINI_ERRORS[marker]
    client = gemini_client(sim, marker)
    for call in (
        lambda: client.models.generate_content(model="gemini-2.5-flash", contents=ASKED),
        lambda: list(client.models.list()),
        lambda: list(client.models.generate_content_stream(model="gemini-2.5-flash", contents=ASKED)),
    ):
        with pytest.raises(cls) as caught:
            call()
        assert caught.value.code == status and caught.value.status == grpc_status
    if marker == "revoked":
        assert caught.value.details["error"]["details"][0]["reason"] == "API_KEY_EXPIRED"


async def test_gemini_async_error_is_the_sdks_class(sim):
    with pytest.raises(genai_errors.ClientError) as caught:
        await gemini_client(sim, "invalid").aio.models.generate_content(model="gemini-2.5-flash", contents=ASKED)
    assert caught.value.code == 400


# --- a stream that fails midway: the provider's error event, raised by the SDK after some text ---


def test_openai_stream_failing_midway_raises_the_sdks_api_error(sim):
    stream = openai_client(sim, "streamfail").chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received)  # some text came first
    assert caught.value.body["type"] == "server_error"


def test_groq_stream_failing_midway_raises_the_sdks_api_error(sim):
    stream = groq_client(sim, "streamfail").chat.completions.create(
        model="llama3-8b-8192", messages=MESSAGES, stream=True
    )
    received = []
    with pytest.raises(groq.APIError):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received)


def test_anthropic_stream_failing_midway_raises_the_sdks_status_error(sim):
    client = anthropic_client(sim, "streamfail")
    received = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(model="claude-sonnet-4", max_tokens=100, messages=MESSAGES) as stream:
            for text in stream.text_stream:
                received.append(text)
    assert "".join(received)
    assert caught.value.type == "overloaded_error"


def test_gemini_stream_failing_midway_raises_the_sdks_server_error(sim):
    client, received = gemini_client(sim, "streamfail"), []
    with pytest.raises(genai_errors.ServerError) as caught:
        for chunk in client.models.generate_content_stream(model="gemini-2.5-flash", contents=ASKED):
            received.append(chunk.text)
    assert "".join(received) and caught.value.code == 503


def test_a_cut_stream_is_a_connection_error_in_the_sdk(sim):
    # The connection closes midway: the body's chunked encoding never ends.
    with pytest.raises(openai.APIConnectionError):
        list(openai_client(sim, "streamcut").chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    with pytest.raises(anthropic.APIConnectionError):
        list(
            anthropic_client(sim, "streamcut").messages.create(
                model="claude-sonnet-4", max_tokens=100, messages=MESSAGES, stream=True
            )
        )


def test_a_stalled_stream_times_out_in_the_sdk(sim):
    client = openai_client(sim, "streamstall").with_options(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
