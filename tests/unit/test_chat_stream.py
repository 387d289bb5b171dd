"""`providers.chat_stream` against the provider simulator, for each provider, over both adapters of
the `ProviderHttp` port: the services' aiohttp client on a real socket (`ProviderClient`) and the
in-process ASGI adapter of the tests (`InProcessHttp`). Deltas and the provider's own usage; a
refusal before the stream; an error event midway; a cut; a stall (a short idle timeout); stopping
early closes the provider's stream. Plus the SSE decoder and each provider's event parsing, pure.

Every wait is bounded: the stall lasts minutes on the simulator's side, and the client gives up in
well under a second; the module's timeout fails anything that would hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest

import providers as p
from providers.base import SseDecoder, SseEvent
from schemas.events import KeyCheckStatus, Provider
from services.provider_simulator import SimulatorServer, SimulatorState, base_urls, build_app
from services.shared.provider_http import ProviderClient
from tests.fakes import InProcessHttp
from tests.support import SIM_KEY_SHAPES

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there, what is streamed back to me now?"},
]
MODEL = {provider: p.of(provider).models[-1] for provider in Provider}  # a model of each provider's catalog
IDLE_S = 0.3  # the idle timeout the stall tests give the client


def key(provider: Provider, marker: str) -> str:
    return SIM_KEY_SHAPES[provider].format(marker)


@pytest.fixture(scope="module")
def server():
    with SimulatorServer() as sim:
        yield sim


class Sim:
    """A simulator and a client of it, over one of the two adapters."""

    def __init__(self, state: SimulatorState, settings: p.ProviderSettings, make_client):
        self.state, self.settings, self._make_client = state, settings, make_client

    def client(self, idle_s: float = 10):
        return self._make_client(idle_s)


@pytest.fixture(params=["aiohttp", "in-process"])
def sim(request, server):
    if request.param == "aiohttp":
        server.state.reset()
        settings = p.ProviderSettings(**{k.lower(): v for k, v in server.env().items()})
        return Sim(server.state, settings, lambda idle_s: ProviderClient(timeout_s=10, stream_idle_timeout_s=idle_s))
    state = SimulatorState()
    app = build_app(state)
    settings = p.ProviderSettings(**{k.lower(): v for k, v in base_urls("http://sim").items()})
    return Sim(
        state,
        settings,
        lambda idle_s: InProcessHttp(
            transport=httpx.ASGITransport(app=app), base_url="http://sim", timeout=httpx.Timeout(10, read=idle_s)
        ),
    )


async def collect(stream: AsyncIterator[str | p.ChatReply]) -> tuple[list[str], p.ChatReply | None, Exception | None]:
    """The deltas, the final reply and the error of a stream, whichever came."""
    deltas: list[str] = []
    try:
        async for item in stream:
            if isinstance(item, p.ChatReply):
                return deltas, item, None
            deltas.append(item)
    except p.ProviderError as exc:
        return deltas, None, exc
    raise AssertionError("the stream ended without a ChatReply or a ProviderError")


def stream(sim: Sim, client, provider: Provider, marker: str) -> AsyncIterator[str | p.ChatReply]:
    return p.chat_stream(client, sim.settings, provider, key(provider, marker), MODEL[provider], MESSAGES)


@pytest.mark.parametrize("provider", list(Provider))
async def test_deltas_as_they_come_then_the_reply_with_the_providers_usage(sim, provider):
    async with sim.client() as client:
        deltas, reply, error = await collect(stream(sim, client, provider, "valid"))
        whole = await p.chat_completion(
            client, sim.settings, provider, key(provider, "valid"), MODEL[provider], MESSAGES
        )
    assert error is None and reply is not None
    assert len(deltas) > 3 and all(isinstance(d, str) and d for d in deltas)
    assert reply.text == "".join(deltas) == whole.text
    assert "hello there" in reply.text
    # The figures are the provider's, from its stream: the simulator counts them as for a whole answer.
    assert (reply.input_tokens, reply.output_tokens) == (whole.input_tokens, whole.output_tokens)
    assert reply.input_tokens > 0 and reply.output_tokens > 0
    assert reply.model == MODEL[provider]
    assert sim.state.endpoints()[f"{provider.value} stream"] == 1
    await wait_for_streams(sim.state, {"completed": 1})  # read to its end, not abandoned


EXPECTED_REFUSAL = {
    "invalid": KeyCheckStatus.INVALID,
    "revoked": KeyCheckStatus.REVOKED_OR_EXPIRED,
    "noquota": KeyCheckStatus.QUOTA_EXHAUSTED,
    "denied": KeyCheckStatus.PERMISSION_DENIED,
    "ratelimited": KeyCheckStatus.RATE_LIMITED,
    "down": KeyCheckStatus.PROVIDER_UNAVAILABLE,
}


@pytest.mark.parametrize("provider", list(Provider))
@pytest.mark.parametrize("marker", list(EXPECTED_REFUSAL))
async def test_a_refusal_before_the_stream_is_classified_as_any_refusal(sim, provider, marker):
    async with sim.client() as client:
        deltas, reply, error = await collect(stream(sim, client, provider, marker))
    assert deltas == [] and reply is None
    assert isinstance(error, p.ProviderError)
    assert error.verdict.status is EXPECTED_REFUSAL[marker]
    assert error.http_status is not None and error.http_status >= 400
    assert not error.timed_out
    assert key(provider, marker) not in error.verdict.message and key(provider, marker) not in str(error)


@pytest.mark.parametrize("provider", list(Provider))
async def test_an_error_event_midway_raises_after_the_text_before_it(sim, provider):
    async with sim.client() as client:
        deltas, reply, error = await collect(stream(sim, client, provider, "streamfail"))
    assert deltas and reply is None
    assert isinstance(error, p.ProviderError)
    # Each simulator's midway error is an overload / server error: not a verdict on the key.
    assert error.verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert error.http_status == 200 and not error.timed_out
    await wait_for_streams(sim.state, {"failed": 1})


@pytest.mark.parametrize("provider", list(Provider))
async def test_a_stream_cut_before_its_end_is_an_answer_cut_off(sim, provider):
    async with sim.client() as client:
        deltas, reply, error = await collect(stream(sim, client, provider, "streamcut"))
    assert deltas and reply is None
    assert isinstance(error, p.ProviderError)
    assert error.verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert "the answer was cut off" in error.verdict.message
    assert not error.timed_out


@pytest.mark.parametrize("provider", list(Provider))
async def test_a_stalled_stream_times_out(sim, provider):
    # The simulator stops sending for 5 minutes midway; the client waits IDLE_S for each next piece.
    async with sim.client(idle_s=IDLE_S) as client:
        deltas, reply, error = await asyncio.wait_for(collect(stream(sim, client, provider, "streamstall")), 20)
    assert deltas and reply is None
    assert isinstance(error, p.ProviderError)
    assert error.timed_out
    assert error.verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert "the answer was cut off" in error.verdict.message
    # Leaving closed the stream: the simulator saw the client go away during its stall.
    await wait_for_streams(sim.state, {"abandoned": 1})


async def wait_for_streams(state: SimulatorState, expected: dict[str, int], within_s: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while state.streams() != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"streams {state.streams()}, expected {expected}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("provider", list(Provider))
async def test_closing_the_stream_early_stops_the_provider(sim, provider):
    # A slow stream: 40 pieces 100 ms apart (4 s); we stop after three.
    sim.state.register(key(provider, "streamslow"), "stream_slow", delay_ms=100, chunks=40)
    async with sim.client() as client:
        deltas = []
        async with contextlib.aclosing(stream(sim, client, provider, "streamslow")) as items:
            async for item in items:
                deltas.append(item)
                if len(deltas) == 3:
                    break
        assert all(isinstance(d, str) for d in deltas)
        await wait_for_streams(sim.state, {"abandoned": 1}, within_s=3)


async def test_cancelling_the_consumer_stops_the_provider(sim):
    sim.state.register(key(Provider.OPENAI, "streamslow"), "stream_slow", delay_ms=100, chunks=40)
    three = asyncio.Event()
    deltas: list[str | p.ChatReply] = []

    async def consume(client) -> None:
        async for item in stream(sim, client, Provider.OPENAI, "streamslow"):
            deltas.append(item)
            if len(deltas) == 3:
                three.set()

    async with sim.client() as client:
        task = asyncio.create_task(consume(client))
        await asyncio.wait_for(three.wait(), 10)
        task.cancel()  # the chat's Stop
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for_streams(sim.state, {"abandoned": 1}, within_s=3)
    assert 3 <= len(deltas) < 40


async def test_a_slow_stream_read_to_its_end_has_all_its_pieces(sim):
    sim.state.register(key(Provider.ANTHROPIC, "streamslow"), "stream_slow", delay_ms=5, chunks=25)
    async with sim.client() as client:
        deltas, reply, error = await collect(stream(sim, client, Provider.ANTHROPIC, "streamslow"))
    assert error is None and len(deltas) == 25 and reply.text == "".join(deltas)


async def test_no_answer_in_time_is_a_timeout_before_the_stream(sim):
    # `slow` delays the answer itself (5 s here), so nothing starts within the idle timeout.
    async with sim.client(idle_s=IDLE_S) as client:
        deltas, reply, error = await asyncio.wait_for(collect(stream(sim, client, Provider.GROQ, "slow")), 20)
    assert deltas == [] and reply is None
    assert error.timed_out and error.http_status is None
    assert error.verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE


async def test_an_unreachable_provider_is_no_timeout():
    settings = p.ProviderSettings(openai_base_url="http://127.0.0.1:9/v1")  # nothing listens on port 9
    async with ProviderClient(timeout_s=2) as client:
        deltas, reply, error = await collect(p.chat_stream(client, settings, "openai", "sk-x", "gpt-4o", MESSAGES))
    assert reply is None and not error.timed_out
    assert error.verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE


async def test_chat_completion_says_when_it_timed_out(server):
    server.state.reset()
    settings = p.ProviderSettings(**{k.lower(): v for k, v in server.env().items()})
    server.state.register(key(Provider.OPENAI, "slow"), "slow", delay_ms=3000)
    async with ProviderClient(timeout_s=0.2) as client:
        with pytest.raises(p.ProviderError) as slow:
            await p.chat_completion(client, settings, "openai", key(Provider.OPENAI, "slow"), "gpt-4o", MESSAGES)
        with pytest.raises(p.ProviderError) as refused:
            await p.chat_completion(client, settings, "openai", key(Provider.OPENAI, "revoked"), "gpt-4o", MESSAGES)
    assert slow.value.timed_out and slow.value.verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert not refused.value.timed_out and refused.value.http_status == 401


def test_provider_error_timed_out_is_a_keyword_defaulting_to_false():
    verdict = p.unavailable("openai")
    assert p.ProviderError(Provider.OPENAI, verdict, 503).timed_out is False
    assert p.ProviderError(Provider.OPENAI, verdict, timed_out=True).timed_out is True
    with pytest.raises(TypeError):
        p.ProviderError(Provider.OPENAI, verdict, None, True)  # type: ignore[misc]


async def test_a_stream_with_text_the_provider_never_ended_is_cut_off():
    """Over a transport that just replays bytes: an OpenAI stream whose body ends before [DONE]."""
    body = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}],"model":"gpt-4o"}\n\n'
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    async with InProcessHttp(transport=transport) as client:
        settings = p.ProviderSettings(openai_base_url="http://mock/v1")
        deltas, reply, error = await collect(p.chat_stream(client, settings, "openai", "sk-x", "gpt-4o", MESSAGES))
    assert deltas == ["Hi"] and reply is None and "cut off" in error.verdict.message


async def test_a_stream_ended_without_usage_is_not_billed_at_a_guess():
    body = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n'
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    async with InProcessHttp(transport=transport) as client:
        settings = p.ProviderSettings(openai_base_url="http://mock/v1")
        _, reply, error = await collect(p.chat_stream(client, settings, "openai", "sk-x", "gpt-4o", MESSAGES))
    assert reply is None and error.verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE


async def test_what_is_sent_asks_each_provider_for_a_stream_with_usage():
    seen: dict[str, httpx.Request] = {}

    def record(request: httpx.Request) -> httpx.Response:
        seen[request.url.host] = request
        return httpx.Response(500, json={"error": {"message": "no"}})

    async with InProcessHttp(transport=httpx.MockTransport(record)) as client:
        settings = p.ProviderSettings(
            openai_base_url="http://openai/v1",
            groq_base_url="http://groq",
            anthropic_base_url="http://anthropic",
            gemini_base_url="http://gemini",
        )
        for provider in Provider:
            await collect(p.chat_stream(client, settings, provider, key(provider, "valid"), MODEL[provider], MESSAGES))
    for host in ("openai", "groq"):
        body = json.loads(seen[host].content)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert seen["openai"].url.path == "/v1/chat/completions"
    assert seen["groq"].url.path == "/openai/v1/chat/completions"
    assert json.loads(seen["anthropic"].content)["stream"] is True
    assert seen["anthropic"].url.path == "/v1/messages"
    assert seen["gemini"].url.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert seen["gemini"].url.params["alt"] == "sse"
    assert "stream" not in json.loads(seen["gemini"].content)


# --- pure: the SSE decoder and each provider's events ---

WIRE = (
    b": a comment\r\n"
    b"event: message_start\r\n"
    b'data: {"a": 1}\r\n'
    b"\r\n"
    b"data: line one\n"
    b"data: line two\n"
    b"\n"
    b"data:no space\r"
    b"id: 7\r"
    b"\r"
    b"data: [DONE]\n\n"
)
EVENTS = [
    SseEvent("message_start", '{"a": 1}'),
    SseEvent("", "line one\nline two"),
    SseEvent("", "no space"),
    SseEvent("", "[DONE]"),
]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_sse_decoder_gives_the_same_events_whatever_the_chunking(size):
    decoder = SseDecoder()
    events = [e for i in range(0, len(WIRE), size) for e in decoder.feed(WIRE[i : i + size])]
    assert events + decoder.close() == EVENTS


def test_sse_decoder_splits_between_cr_and_lf_and_across_utf8():
    decoder = SseDecoder()
    text = "data: héllo ✓\r\n\r\n".encode()
    events = []
    for i in range(len(text)):
        events += decoder.feed(text[i : i + 1])
    assert events == [SseEvent("", "héllo ✓")]


def test_sse_decoder_hands_over_an_event_without_its_final_blank_line_on_close():
    decoder = SseDecoder()
    assert decoder.feed(b"data: last") == []
    assert decoder.close() == [SseEvent("", "last")]


def test_sse_decoder_refuses_an_endless_line():
    decoder = SseDecoder(max_line=100)
    with pytest.raises(ValueError):
        decoder.feed(b"data: " + b"x" * 200)


def test_groq_usage_only_in_x_groq_is_read():
    event = SseEvent(
        "",
        json.dumps(
            {
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "x_groq": {"id": "req_1", "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
            }
        ),
    )
    piece = p.of("groq").parse_stream_event(event)
    assert (piece.input_tokens, piece.output_tokens, piece.done) == (9, 4, False)
    stopped = p.of("groq").parse_stream_event(SseEvent("", '{"choices": [], "x_groq": {"error": "over capacity"}}'))
    assert stopped.error is not None
    assert p.of("openai").parse_stream_event(SseEvent("", "[DONE]")).done


def test_errors_midway_are_classified_by_what_they_say():
    anthropic = p.of("anthropic")
    limited = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert anthropic.classify_stream_error(limited).status is KeyCheckStatus.RATE_LIMITED
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert anthropic.classify_stream_error(overloaded).status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    gemini = p.of("gemini")
    quota = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota"}}
    assert gemini.classify_stream_error(quota).status is KeyCheckStatus.RATE_LIMITED
    openai = p.of("openai")
    server = {"error": {"message": "oops", "type": "server_error", "code": None}}
    assert openai.classify_stream_error(server).status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert anthropic.parse_stream_event(SseEvent("ping", '{"type": "ping"}')) == p.base.IGNORED


async def test_stream_behaviours_are_registered_through_the_control_api():
    state = SimulatorState()
    app = build_app(state)
    settings = p.ProviderSettings(**{k.lower(): v for k, v in base_urls("http://sim").items()})
    async with InProcessHttp(transport=httpx.ASGITransport(app=app), base_url="http://sim", timeout=10) as client:
        platform_key = "sk-platform-key-without-marker-01"
        r = await client.post(
            "/_sim/keys", json={"key": platform_key, "behaviour": "stream_slow", "delay_ms": 1, "chunks": 7}
        )
        assert r.status_code == 200
        # Everything but a stream answers as valid, at once.
        assert (await p.list_models(client, settings, "openai", platform_key)).status_code == 200
        deltas, reply, _ = await collect(p.chat_stream(client, settings, "openai", platform_key, "gpt-4o", MESSAGES))
        assert len(deltas) == 7 and reply is not None
        await client.post("/_sim/keys", json={"key": platform_key, "behaviour": "stream_cut"})
        _, reply, error = await collect(p.chat_stream(client, settings, "openai", platform_key, "gpt-4o", MESSAGES))
        assert reply is None and "cut off" in error.verdict.message
        calls = (await client.get("/_sim/calls")).json()
        assert calls["streams"] == {"completed": 1, "cut": 1}
        assert calls["by_endpoint"] == {"openai models": 1, "openai stream": 2}
